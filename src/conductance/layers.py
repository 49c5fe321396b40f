"""Layer addressing: which tensor of a forward pass a name stands for (a *site*).

A layer is named by its dotted name in ``model.named_modules()`` (or given as the
module object). When the module returns a tuple, a list or a dict (an LSTM, most
transformer blocks), the element is named in brackets: ``"lstm[0]"``,
``"encoder.layer.3.attention[0]"``, ``"block[hidden_states]"``. The suffix ``":input"``
names the module's input instead of its output (``"fc2:input"``: its first positional
argument; ``"block[1]:input"``: the second one, ``"block[mask]:input"``: keyword ``mask``).
The hooks that read and change sites while the model runs are in :mod:`conductance.sites`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from .errors import ConductanceError

LayerSpec = Union[str, nn.Module, tuple]

_ELEMENT = re.compile(r"^(?P<name>.*?)\[(?P<element>[^\[\]]+)\]$")
#: a site name ending in this observes the module's input
INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class LayerRef:
    """A resolved layer: its display name, its module, and which element of its output."""

    name: str
    module: nn.Module
    element: Union[int, str, None] = None
    use_input: bool = False


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if name.split(".")[-1] and name.split(".")[-1] in n][:5]
    if close:
        return "Did you mean " + ", ".join(repr(c) for c in close) + "?"
    shown = [n for n in names if n][:12]
    return "Layers of this model include: " + ", ".join(repr(n) for n in shown) + (" ..." if len(names) > 13 else "")


def _layer_kinds(value: Any, what: str) -> str:
    hint = (f" (for module number {value} of an nn.Sequential pass its name, the string '{value}')"
            if isinstance(value, int) and not isinstance(value, bool) else "")
    return (f"{what} must be a dotted module name (str), an nn.Module of the model, a (name, element) pair, or a "
            f"list of them; got {type(value).__name__} {value!r}{hint}")


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Sequence[LayerSpec]],
                   use_input: bool = False) -> list[LayerRef]:
    """Turn user layer specifications into :class:`LayerRef` objects.

    Parameters
    ----------
    layers : a dotted name (``"fc1"``, ``"lstm[0]"``, ``"fc2:input"``), a module of ``model``, a
        ``(name or module, element)`` pair, a :class:`LayerRef` (taken as it is), or a list of them.
    use_input : bool
        Observe every layer's input instead of its output (as the ``":input"`` suffix does for one).

    Returns
    -------
    list of LayerRef, in the order given.

    Raises
    ------
    ValueError
        For a name that is not a module of ``model`` (with the closest names), a module
        object that does not belong to ``model``, or a duplicate.
    """
    if isinstance(layers, (str, nn.Module, LayerRef)) or (isinstance(layers, tuple) and len(layers) == 2
                                                and isinstance(layers[1], (int, str))
                                                and isinstance(layers[0], (str, nn.Module))):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise ConductanceError(_layer_kinds(layers, "layers"))
    if len(layers) == 0:
        raise ValueError("no layers given: pass a dotted module name such as 'features.3' or a list of them")
    by_name = dict(model.named_modules())
    by_id = {id(m): n for n, m in by_name.items()}
    names = list(by_name)
    refs: list[LayerRef] = []
    labels: set[str] = set()
    for spec in layers:
        if isinstance(spec, LayerRef):
            if spec.name in labels:
                raise ValueError(f"layer {spec.name!r} was requested twice")
            labels.add(spec.name)
            refs.append(spec)
            continue
        element: Union[int, str, None] = None
        at_input, suffix = use_input, ""
        if isinstance(spec, str) and spec not in by_name and spec.endswith(INPUT_SUFFIX):
            spec, at_input, suffix = spec[:-len(INPUT_SUFFIX)], True, INPUT_SUFFIX
        if isinstance(spec, tuple):
            spec, element = spec
        if isinstance(spec, nn.Module):
            if id(spec) not in by_id:
                raise ValueError(f"the module {type(spec).__name__} given as a layer is not part of the model; "
                                 "pass a submodule of the model (or its dotted name)")
            name, module = by_id[id(spec)], spec
        elif isinstance(spec, str):
            name = spec
            match = _ELEMENT.match(spec)
            if match and match.group("name") in by_name and element is None:
                name = match.group("name")
                raw = match.group("element")
                element = int(raw) if raw.lstrip("-").isdigit() else raw
            if name not in by_name:
                raise ValueError(f"the model has no layer named {spec!r}. {_suggest(name, names)}")
            module = by_name[name]
        else:
            raise ConductanceError(_layer_kinds(spec, "each of layers"))
        label = name if element is None else f"{name}[{element}]"
        if label == "":
            label = "<model>"
        label += suffix
        if label in labels:
            raise ValueError(f"layer {label!r} was requested twice")
        labels.add(label)
        refs.append(LayerRef(label, module, element, at_input))
    return refs


def select_element(ref: LayerRef, value: Any) -> torch.Tensor:
    """The observed tensor of a module's output (or input), following ``ref.element``.

    Parameters
    ----------
    ref : LayerRef
    value : Tensor, tuple, list or dict
        What the module returned (or received).

    Returns
    -------
    Tensor
        Any shape; a missing or non-tensor element raises a ConductanceError naming the fix.
    """
    if ref.element is None:
        if isinstance(value, torch.Tensor):
            return value
        kind = type(value).__name__
        hint = next(iter(value), "key") if isinstance(value, dict) else "0"
        raise ConductanceError(
            f"layer {ref.name!r} {'receives' if ref.use_input else 'returns'} a {kind}, not a tensor; "
            f"name the element to observe, e.g. '{ref.name}[{hint}]'")
    if isinstance(value, torch.Tensor):
        # indexing a tensor would pick one example's row and look like a valid layer
        base = ref.name.rsplit("[", 1)[0]
        raise ConductanceError(
            f"layer {ref.name!r} {'receives' if ref.use_input else 'returns'} a tensor of shape "
            f"{tuple(value.shape)}, not a tuple, so there is no element {ref.element!r} to pick (transformers 5.x "
            f"blocks return tensors); name it without the brackets: {base!r}")
    try:
        selected = value[ref.element]
    except (IndexError, KeyError, TypeError) as exc:
        raise ConductanceError(f"layer {ref.name!r}: cannot select element {ref.element!r} "
                               f"of its {type(value).__name__} ({exc})") from None
    if not isinstance(selected, torch.Tensor):
        raise ConductanceError(f"layer {ref.name!r}: element {ref.element!r} is a "
                               f"{type(selected).__name__}, not a tensor")
    return selected


def replace_element(ref: LayerRef, value: Any, new: torch.Tensor) -> Any:
    """``value`` with the observed element replaced by ``new`` (same container type).

    Parameters
    ----------
    ref : LayerRef
    value : Tensor, tuple (named or not), list or dict
    new : Tensor

    Returns
    -------
    Any
        A new container (a list or dict is copied, not changed), or ``new`` itself without an element.
    """
    if ref.element is None:
        return new
    if isinstance(value, (tuple, list)):
        if not isinstance(ref.element, int):
            raise ConductanceError(f"layer {ref.name!r}: a {type(value).__name__} is indexed by position, "
                                   f"not by {ref.element!r}")
        items = list(value)
        items[ref.element] = new
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        out = type(value)(value) if not hasattr(value, "__dataclass_fields__") else value
        out[ref.element] = new
        return out
    raise ConductanceError(f"layer {ref.name!r}: cannot replace element {ref.element!r} of a {type(value).__name__}")
