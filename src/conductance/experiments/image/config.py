"""Settings of the image experiments: the quick and full sizes, the measures compared and the paper's numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .. import fashion_inception as fi

#: Rankings compared in the ablation and feature-selection protocols (random units are always added).
MEASURES = ("conductance", "internal_influence", "activation", "grad_x_activation", "gradient",
            "layer_integrated_gradients")


#: The paper's ablation numbers (Inception v1 on 100 ImageNet images; PAPER.md section 4).
PAPER_ABLATION: dict[str, dict[str, float]] = {
    "conductance": {"mean_flips": 3.7, "more_than_10": 3, "max_flips": 16, "examples": 100},
    "internal_influence": {"top_10_flipped": 5, "examples": 100}}


#: Black photo after the (x - 0.5) / 0.5 normalisation both ImageNet networks use here.
BLACK = -1.0


@dataclass
class ImageSettings:
    """Sizes of one run; :func:`settings_for` gives the quick and the full ones."""

    quick: bool
    photos: list[str]
    effnet_blocks: list[str]
    effnet_pixel_block: str
    googlenet_blocks: list[str]
    googlenet_pixel_block: str
    top_filters: int = 3
    photo_rule: dict = field(default_factory=dict)      # layer_conductance / layer_importance rule, photos
    pixel_rule: dict = field(default_factory=dict)      # neuron_conductance rule
    train_config: fi.TrainConfig = fi.FULL_CONFIG
    ablation_layers: list[str] = field(default_factory=lambda: list(fi.INCEPTION_LAYERS))
    ablation_images: int = 100
    fashion_rule: dict = field(default_factory=dict)     # ablation rankings
    selection_rule: dict = field(default_factory=dict)   # feature-selection rankings
    random_seeds: int = 2
    selection_layers: list[str] = field(default_factory=lambda: list(fi.INCEPTION_LAYERS))
    n_select: int = 30
    n_evaluate: int = 20
    ks: tuple = (1, 2, 5, 10, 20)
    selection_random_seeds: int = 5
    measures: tuple = MEASURES
    max_units: Optional[int] = None                     # longest prefix tried in the per-photo flip counts


def settings_for(quick: bool) -> ImageSettings:
    """The quick (about a minute on 2 cores, training included) or the full settings.

    Parameters
    ----------
    quick : bool

    Returns
    -------
    ImageSettings
    """
    from ... import assets

    gl = {"n_steps": 32, "method": "gausslegendre"}
    if quick:
        return ImageSettings(
            quick=True, photos=["chelsea", "coffee"], effnet_blocks=["_blocks.10", "_blocks.15"],
            effnet_pixel_block="_blocks.10", googlenet_blocks=["inception4d", "inception5b"],
            googlenet_pixel_block="inception4d", photo_rule={"tolerance": 0.05, "max_steps": 128},
            pixel_rule=dict(gl),
            train_config=fi.QUICK_CONFIG, ablation_layers=["inception4a"], ablation_images=20,
            fashion_rule={"tolerance": 0.05, "max_steps": 64},
            selection_rule={"tolerance": 0.05, "max_steps": 64}, random_seeds=1,
            selection_layers=["inception4a"], n_select=10, n_evaluate=6, ks=(1, 2, 5), selection_random_seeds=2,
            measures=("conductance", "internal_influence", "activation", "grad_x_activation"), max_units=32)
    return ImageSettings(
        quick=False, photos=list(assets.PHOTOS), effnet_blocks=list(assets.EFFICIENTNET_LAYERS),
        effnet_pixel_block="_blocks.10", googlenet_blocks=["inception3a", "inception4a", "inception4d",
                                                           "inception5b"],
        googlenet_pixel_block="inception4d", photo_rule={"tolerance": 0.02, "max_steps": 256},
        pixel_rule={"n_steps": 64, "method": "gausslegendre"},
        fashion_rule={"tolerance": 0.02, "max_steps": 256}, selection_rule={"tolerance": 0.02, "max_steps": 256})
