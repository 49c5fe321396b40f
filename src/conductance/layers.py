"""Layer addressing and the hooks that observe layers during a forward pass.

A layer is named by its dotted name in ``model.named_modules()`` (or given as the
module object). When the module returns a tuple, a list or a dict (an LSTM, most
transformer blocks), the element is named in brackets: ``"lstm[0]"``,
``"encoder.layer.3.attention[0]"``, ``"block[hidden_states]"``.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConductanceError

LayerSpec = Union[str, nn.Module, tuple]

_ELEMENT = re.compile(r"^(?P<name>.*?)\[(?P<element>[^\[\]]+)\]$")


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

    Raises
    ------
    ValueError
        For a name that is not a module of ``model`` (with the closest names), a module
        object that does not belong to ``model``, or a duplicate.
    """
    if isinstance(layers, (str, nn.Module)) or (isinstance(layers, tuple) and len(layers) == 2
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
    for spec in layers:
        element: Union[int, str, None] = None
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
        if any(r.name == label for r in refs):
            raise ValueError(f"layer {label!r} was requested twice")
        refs.append(LayerRef(label, module, element, use_input))
    return refs


def select_element(ref: LayerRef, value: Any) -> torch.Tensor:
    """The observed tensor of a module's output (or input), following ``ref.element``."""
    if ref.element is None:
        if isinstance(value, torch.Tensor):
            return value
        kind = type(value).__name__
        hint = "0" if isinstance(value, (tuple, list)) else (next(iter(value), "key") if isinstance(value, dict) else "0")
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
    """``value`` with the observed element replaced by ``new`` (same container type)."""
    if ref.element is None:
        return new
    if isinstance(value, tuple):
        items = list(value)
        items[ref.element] = new
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        items = list(value)
        items[ref.element] = new
        return items
    if isinstance(value, dict):
        out = type(value)(value) if not hasattr(value, "__dataclass_fields__") else value
        out[ref.element] = new
        return out
    raise ConductanceError(f"layer {ref.name!r}: cannot replace element {ref.element!r} of a {type(value).__name__}")


class Recorder:
    """Hooks that record each requested layer's value during one forward pass.

    With ``cut_below=True`` the forward runs without autograd until the first
    requested layer fires; from there on autograd is on and each layer's value is a
    tensor that requires grad, so the backward stops at the lowest requested layer.
    With ``copy=True`` each observed value is handed downstream as a clone, so in-place
    operations after the layer cannot change what was recorded. With ``copy=False`` the
    value itself goes on (a copy less per layer and point) and :meth:`modified_in_place`
    tells afterwards whether the model changed it.
    """

    def __init__(self, refs: Sequence[LayerRef], cut_below: bool, replace: Optional[dict] = None,
                 keep_downstream: bool = False, copy: bool = True):
        self.refs = list(refs)
        self.keep_downstream = keep_downstream
        self.copy = copy or keep_downstream
        self._versions: dict[str, int] = {}
        #: with ``keep_downstream``, the clone handed to the rest of the model, per layer: its
        #: autograd node is the single entry through which the layer's value flows downstream
        self.downstream: dict[str, torch.Tensor] = {}
        self.downstream_node: dict[str, Any] = {}
        self.cut_below = cut_below
        self.replace = dict(replace or {})
        self.values: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def _observe(self, ref: LayerRef, value: Any) -> Any:
        self.calls[ref.name] = self.calls.get(ref.name, 0) + 1
        if self.calls[ref.name] > 1:
            raise ConductanceError(
                f"layer {ref.name!r} ran {self.calls[ref.name]} times in one forward pass (a shared or "
                "recurrent module); conductance needs one value per forward: hook a module that runs once")
        tensor = original = select_element(ref, value)
        if not tensor.is_floating_point():
            raise ConductanceError(f"layer {ref.name!r} produces a {tensor.dtype} tensor; conductance needs "
                                   "a floating-point layer (integer values cannot be differentiated)")
        if self.cut_below and not torch.is_grad_enabled():
            torch.set_grad_enabled(True)
        if ref.name in self.replace:
            new = self.replace[ref.name]
            if new.shape != tensor.shape:
                raise ConductanceError(f"layer {ref.name!r}: a replacement of shape {tuple(new.shape)} cannot "
                                       f"stand in for its value of shape {tuple(tensor.shape)}")
            tensor = new.to(tensor.dtype).detach().requires_grad_(True)
        elif not tensor.requires_grad:
            tensor = tensor.detach().requires_grad_(True)
        self.values[ref.name] = tensor
        if not self.copy:
            self._versions[ref.name] = tensor._version
            return value if tensor is original else replace_element(ref, value, tensor)
        passed = tensor.clone()
        if self.keep_downstream:
            self.downstream[ref.name] = passed
            self.downstream_node[ref.name] = passed.grad_fn   # an in-place op later would replace it
        return replace_element(ref, value, passed)

    def modified_in_place(self) -> list[str]:
        """Layers whose recorded value (handed on without a copy) the model has since changed in place,
        or, with ``keep_downstream``, whose copy handed downstream it changed."""
        if self.keep_downstream:
            return [n for n, t in self.downstream.items() if t._version != 0]
        return [n for n, v in self._versions.items() if self.values[n]._version != v]

    @contextlib.contextmanager
    def attached(self) -> Iterator["Recorder"]:
        """Register the hooks; they are removed on exit, whatever happens inside."""
        handles = []
        grad_mode = torch.is_grad_enabled()
        try:
            for ref in self.refs:
                if ref.use_input:
                    handles.append(ref.module.register_forward_pre_hook(self._pre_hook(ref), with_kwargs=True))
                else:
                    handles.append(ref.module.register_forward_hook(self._post_hook(ref)))
            if self.cut_below:
                torch.set_grad_enabled(False)
            yield self
        finally:
            for handle in handles:
                handle.remove()
            torch.set_grad_enabled(grad_mode)

    def _post_hook(self, ref: LayerRef):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return self._observe(ref, output)
        return hook

    def _pre_hook(self, ref: LayerRef):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if ref.element is None or isinstance(ref.element, int):
                value = args
                view = LayerRef(ref.name, ref.module, 0 if ref.element is None else ref.element, True)
                return self._observe(view, value), kwargs
            view = LayerRef(ref.name, ref.module, ref.element, True)
            return args, self._observe(view, kwargs)
        return hook
