"""Hooks on sites: reading and changing a model's intermediate values while it runs.

A *site* is a tensor of a forward pass named as in :mod:`conductance.layers`: a module's
output (``"fc1"``, an element of a tuple or dict output ``"lstm[0]"``, ``"block[hidden_states]"``)
or, with the ``":input"`` suffix (or ``at_input=True``), its input (``"fc2:input"``). A site
may also be given as the module object, a ``(name, element)`` pair or a resolved
:class:`~conductance.layers.LayerRef`.

Two context managers install hooks and remove them on exit, also on error:

- :func:`record` stores each site's value (one per forward pass);
- :func:`intervene` replaces or modifies a site's value (``{site: fn}``).

This is the only module of the package that registers module hooks (the literal
:mod:`conductance.reference` keeps its own, on a copy of the model, to stay independent).

Hooks act only for the context that installed them: each ``with`` block holds a key in a
:class:`contextvars.ContextVar`, and a hook whose key is not active where the forward runs
passes the value through untouched. So a forward of the same model in another thread (or
another asyncio task) sees neither a recording nor an intervention of this one; a thread
started inside the block does not either, unless it runs in a copy of the context
(``contextvars.copy_context().run(...)``). ``nn.DataParallel`` runs its replicas in threads
of its own, where no key is active: a hooked module running as a replica raises an error
instead of being skipped silently.

The messages for a site the forward never reached, one that ran several times in one
forward pass, and the training-mode warning are written here once.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union, cast

import torch
from torch import nn

from .errors import ConductanceError, warn
from .layers import LayerRef, LayerSpec, replace_element, resolve_layers, select_element

Site = Union[LayerSpec, LayerRef]
#: ``fn(tensor) -> tensor or None``; with ``whole=True`` ``fn(output) -> output or None`` for an
#: output site and ``fn(args, kwargs) -> (args, kwargs) or None`` for an input site.
Edit = Callable[..., Any]

# the installations active in the running context (thread, asyncio task); each is an object() key
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("conductance_sites_active",
                                                                     default=frozenset())
_TRAINING_WARNED: contextvars.ContextVar[bool] = contextvars.ContextVar("conductance_training_warned",
                                                                        default=False)


# --------------------------------------------------------------------------------------------
# messages


def never_reached(names: Sequence[str]) -> ConductanceError:
    """Error for sites whose hooks never fired during the forward pass.

    Parameters
    ----------
    names : sequence of str
        The site labels.

    Returns
    -------
    ConductanceError
        To be raised by the caller.
    """
    return ConductanceError(f"the forward pass never reached layer(s) {list(names)}: the model does not call "
                            "them for this input; choose layers that the forward runs")


def ran_repeatedly(name: str, times: int, need: str = "conductance") -> ConductanceError:
    """Error for a site whose module ran ``times`` (> 1) times in one forward pass.

    Parameters
    ----------
    name : str
        The site label.
    times : int
        How often its module ran.
    need : str
        What the module has to run once for, in the message.

    Returns
    -------
    ConductanceError
        To be raised by the caller.
    """
    return ConductanceError(f"layer {name!r} ran {times} times in one forward pass (a shared or recurrent "
                            f"module); {need} needs one value per forward: hook a module that runs once")


def warn_training(model: nn.Module, what: str = "conductance") -> None:
    """Warn (a ConductanceWarning) when ``model`` is in training mode, once per :func:`training_warned` block.

    ``what`` names the results that dropout and batch-norm make random.

    Parameters
    ----------
    model : nn.Module
    what : str
    """
    if model.training and not _TRAINING_WARNED.get():
        warn(f"the model is in training mode: dropout and batch-norm updates make {what} random and change "
             "the model; call model.eval() first")


@contextlib.contextmanager
def training_warned() -> Iterator[None]:
    """Inside the block :func:`warn_training` stays silent (the caller has warned already); per context,
    so other threads still warn.

    Yields
    ------
    None
    """
    token = _TRAINING_WARNED.set(True)
    try:
        yield
    finally:
        _TRAINING_WARNED.reset(token)


def _replica_error(ref: LayerRef) -> ConductanceError:
    return ConductanceError(
        f"layer {ref.name!r} ran as a replica (nn.DataParallel) while conductance hooks it; DataParallel runs "
        "its replicas in threads of its own, which the hooks of this call do not follow: call the module "
        "inside (model.module) on one device, or use DistributedDataParallel (one process per device)")


# --------------------------------------------------------------------------------------------
# installing hooks


@contextlib.contextmanager
def _installed(hooks: Sequence[tuple[LayerRef, Callable[..., Any], bool]]) -> Iterator[None]:
    """Register ``(ref, fn, prepend)`` hooks for the block: ``fn(output)`` after an output site's module
    runs, ``fn(args, kwargs)`` before an input site's module runs; each returns a replacement or None.
    They act only where this block's key is active; removed on exit, whatever happens."""
    key = object()
    handles = []
    _ACTIVE.set(_ACTIVE.get() | {key})
    try:
        for ref, fn, prepend in hooks:
            if ref.use_input:
                handles.append(ref.module.register_forward_pre_hook(_guard_pre(key, ref, fn), with_kwargs=True,
                                                                    prepend=prepend))
            else:
                handles.append(ref.module.register_forward_hook(_guard_post(key, ref, fn), prepend=prepend))
        yield
    finally:
        for handle in handles:
            handle.remove()
        # not ContextVar.reset: blocks may close out of order (an ExitStack), each removes only its key
        _ACTIVE.set(_ACTIVE.get() - {key})


def _guard_post(key: object, ref: LayerRef, fn: Callable[[Any], Any]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if key not in _ACTIVE.get():
            if getattr(module, "_is_replica", False):
                raise _replica_error(ref)
            return None
        return fn(output)
    return hook


def _guard_pre(key: object, ref: LayerRef, fn: Callable[[tuple, dict], Any]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if key not in _ACTIVE.get():
            if getattr(module, "_is_replica", False):
                raise _replica_error(ref)
            return None
        return fn(args, kwargs)
    return hook


def _input_view(ref: LayerRef) -> tuple[bool, LayerRef]:
    """Where an input site's tensor is: (in the keyword arguments?, the ref to select it with).
    No element or an int: a positional argument (the first by default); a str: a keyword."""
    if isinstance(ref.element, str):
        return True, ref
    return False, LayerRef(ref.name, ref.module, 0 if ref.element is None else ref.element, True)


def read_input(ref: LayerRef, args: tuple, kwargs: dict) -> torch.Tensor:
    """The tensor an input site names, from a module call's ``args`` and ``kwargs``.

    Parameters
    ----------
    ref : LayerRef
        An input site (``ref.use_input``): element None or an int is a positional argument, a str a keyword.
    args : tuple
    kwargs : dict

    Returns
    -------
    Tensor
    """
    in_kwargs, view = _input_view(ref)
    return select_element(view, kwargs if in_kwargs else args)


def write_input(ref: LayerRef, args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the input site's tensor replaced by ``new``.

    Parameters
    ----------
    ref : LayerRef
        An input site.
    args : tuple
    kwargs : dict
    new : Tensor
        Same shape as the tensor it replaces.

    Returns
    -------
    args : tuple
    kwargs : dict
        New containers; the ones given are not changed.
    """
    in_kwargs, view = _input_view(ref)
    if in_kwargs:
        return args, replace_element(view, kwargs, new)
    return replace_element(view, args, new), kwargs


def resolve(model: nn.Module, sites: Union[Site, Sequence[Site]], at_input: bool = False) -> list[LayerRef]:
    """The :class:`~conductance.layers.LayerRef` of each site (see :func:`conductance.layers.resolve_layers`).

    Parameters
    ----------
    model : nn.Module
    sites : a site or a sequence of them
        Names (``"fc1"``, ``"lstm[0]"``, ``"fc2:input"``), modules, ``(name or module, element)`` pairs, or LayerRefs.
    at_input : bool
        Take every site at its module's input.

    Returns
    -------
    list of LayerRef
        In the order given.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # already resolved (the package's own calls, once per forward): skip the walk over the modules
    if (isinstance(sites, (list, tuple)) and sites and not at_input and all(isinstance(s, LayerRef) for s in sites)
            and len({s.name for s in sites}) == len(sites)):
        return list(sites)
    return resolve_layers(model, cast(Union[LayerSpec, Sequence[LayerSpec]], sites), use_input=at_input)


# --------------------------------------------------------------------------------------------
# intervene


class Intervention:
    """What :func:`intervene` yields: the resolved sites and how often each one ran so far.

    Attributes
    ----------
    refs : list of LayerRef
    calls : dict name -> int
        Times each site's hook acted in this block (every forward of this context).
    """

    def __init__(self, refs: Sequence[LayerRef], once: bool, need: str):
        self.refs = list(refs)
        self.calls: dict[str, int] = {r.name: 0 for r in self.refs}
        self._once, self._need = once, need

    def _count(self, ref: LayerRef) -> None:
        self.calls[ref.name] += 1
        if self._once and self.calls[ref.name] > 1:
            raise ran_repeatedly(ref.name, self.calls[ref.name], self._need)

    def require(self) -> None:
        """Raise the never-reached error when some site has not run yet."""
        missing = [n for n, c in self.calls.items() if c == 0]
        if missing:
            raise never_reached(missing)

    def _hook(self, ref: LayerRef, fn: Edit, whole: bool) -> Callable[..., Any]:
        if ref.use_input:
            def pre(args: tuple, kwargs: dict) -> Any:
                self._count(ref)
                if whole:
                    return fn(args, kwargs)
                new = fn(read_input(ref, args, kwargs))
                return None if new is None else write_input(ref, args, kwargs, new)
            return pre

        def post(output: Any) -> Any:
            self._count(ref)
            if whole:
                return fn(output)
            new = fn(select_element(ref, output))
            return None if new is None else replace_element(ref, output, new)
        return post


@contextlib.contextmanager
def intervene(model: nn.Module, edits: Mapping[Site, Edit], *, at_input: bool = False, whole: bool = False,
              prepend: bool = False, once: bool = False, need: str = "an intervention") -> Iterator[Intervention]:
    """Replace or modify sites' values while the model runs in this block (this thread or task only).

    Parameters
    ----------
    model : nn.Module
    edits : dict site -> fn
        ``fn(tensor)`` gets the site's tensor (an output's element, the first positional input, ...)
        every time its module runs and returns the tensor to use instead (any shape the model
        accepts), or None to leave it unchanged (an observer).
    at_input : bool
        Every site is its module's input (as the ``":input"`` suffix makes one).
    whole : bool
        ``fn`` gets the module's whole output and returns a replacement (or None); for an input site
        ``fn(args, kwargs)`` returns ``(args, kwargs)`` (or None). Elements in the site names are ignored.
    prepend : bool
        Run these hooks before the hooks already on the modules (so those see the new values).
    once : bool
        A site that runs a second time in the block raises the ran-several-times error (``need``
        names what needs one value per forward).

    Yields
    ------
    Intervention
        ``calls`` per site; ``require()`` raises for a site that never ran.

    Example
    -------
    >>> with intervene(model, {"features.3": lambda t: t * 0}):
    ...     logits = model(x)
    """
    if not isinstance(edits, Mapping):
        raise ConductanceError(f"edits must be a dict site -> function, got {type(edits).__name__}")
    if not edits:
        raise ConductanceError("intervene got no sites: pass {site: fn}, e.g. {'fc1': lambda t: t * 0}")
    bad = [s for s, fn in edits.items() if not callable(fn)]
    if bad:
        raise ConductanceError(f"the edit for site {bad[0]!r} is a {type(edits[bad[0]]).__name__}, not a function; "
                               "pass fn(tensor) -> tensor (or None to leave the value unchanged)")
    keys = list(edits)
    refs = resolve(model, keys, at_input)
    state = Intervention(refs, once, need)
    with _installed([(ref, state._hook(ref, edits[key], whole), prepend) for ref, key in zip(refs, keys)]):
        yield state


# --------------------------------------------------------------------------------------------
# record


class Recorder:
    """Hooks that record each site's value during one forward pass.

    With ``grad=False`` the values are stored detached and the forward is left unchanged. With
    ``grad=True`` (the engine's mode) each value is a floating-point tensor that requires grad
    and is handed downstream, so gradients can be taken with respect to it:

    - ``cut_below=True``: the forward runs without autograd until the first site fires; from
      there on autograd is on, so the backward stops at the lowest site;
    - ``copy=True``: each value is handed downstream as a clone, so in-place operations after
      the site cannot change what was recorded; with ``copy=False`` the value itself goes on
      (a copy less per site and point) and :meth:`modified_in_place` tells afterwards whether
      the model changed it;
    - ``keep_downstream=True``: the clone handed downstream and its autograd node are kept
      (``downstream``, ``downstream_node``);
    - ``replace``: name -> tensor, a value that stands in for the site's own (same shape).

    ``values``: name -> tensor, ``calls``: name -> times the site ran. A site that runs twice in
    one forward raises the ran-several-times error (``need`` says what needs one value).
    """

    def __init__(self, refs: Sequence[LayerRef], cut_below: bool = False, replace: Optional[dict] = None,
                 keep_downstream: bool = False, copy: bool = True, grad: bool = True, need: str = "conductance"):
        if not grad and (cut_below or replace or keep_downstream):
            raise ConductanceError("cut_below, replace and keep_downstream need grad=True (values that take "
                                   "gradients); drop them to only observe the values")
        self.refs = list(refs)
        self.grad = grad
        self.need = need
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
            raise ran_repeatedly(ref.name, self.calls[ref.name], self.need)
        tensor = original = select_element(ref, value)
        if not self.grad:
            self.values[ref.name] = tensor.detach()
            return None
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
        or, with ``keep_downstream``, whose copy handed downstream it changed.

        Returns
        -------
        list of str
            Layer names; empty when nothing was changed.
        """
        if self.keep_downstream:
            return [n for n, t in self.downstream.items() if t._version != 0]
        return [n for n, v in self._versions.items() if self.values[n]._version != v]

    def require(self) -> None:
        """Raise the never-reached error for sites that have not run."""
        missing = [r.name for r in self.refs if r.name not in self.values]
        if missing:
            raise never_reached(missing)

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        """Register the hooks (for this context only); they are removed on exit, whatever happens inside.

        Yields
        ------
        Recorder
            Itself, with its hooks attached.
        """
        grad_mode = torch.is_grad_enabled()
        try:
            with _installed([(ref, self._hook(ref), False) for ref in self.refs]):
                if self.cut_below:
                    torch.set_grad_enabled(False)
                yield self
        finally:
            torch.set_grad_enabled(grad_mode)

    def _hook(self, ref: LayerRef) -> Callable[..., Any]:
        if not ref.use_input:
            return lambda output: self._observe(ref, output)
        in_kwargs, view = _input_view(ref)

        def pre(args: tuple, kwargs: dict) -> Any:
            if in_kwargs:
                new = self._observe(view, kwargs)
                return None if new is None else (args, new)
            new = self._observe(view, args)
            return None if new is None else (new, kwargs)
        return pre


@contextlib.contextmanager
def record(model: nn.Module, sites: Union[Site, Sequence[Site]], *, at_input: bool = False, grad: bool = False,
           cut_below: bool = False, copy: bool = True, keep_downstream: bool = False,
           replace: Optional[Mapping[str, torch.Tensor]] = None, need: str = "recording") -> Iterator[Recorder]:
    """Record each site's value while the model runs in this block (this thread or task only).

    Parameters
    ----------
    model : nn.Module
    sites : a site or a list of them (see the module docstring)
    at_input : bool
        Every site is its module's input.
    grad : bool
        False: store detached values, leave the forward as it is. True: the values require grad
        (see :class:`Recorder` for ``cut_below``, ``copy``, ``keep_downstream``, ``replace``).

    Yields
    ------
    Recorder
        ``values[name]``: Tensor (batch, *site_shape) for each site that ran; ``require()``
        raises for a site the forward never reached. A site running twice raises.

    Example
    -------
    >>> with record(model, ["fc1", "fc2:input"]) as rec, torch.no_grad():
    ...     model(x)
    >>> rec.require(); rec.values["fc1"].shape
    """
    refs = resolve(model, sites, at_input)
    with Recorder(refs, cut_below=cut_below, replace=dict(replace or {}), keep_downstream=keep_downstream,
                  copy=copy, grad=grad, need=need).attached() as recorder:
        yield recorder
