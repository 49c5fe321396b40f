"""Feature selection: do the units a measure ranks highly carry the information about the class?

The task follows the feature-selection experiment of Dhamdhere, Sundararajan and Yan, "How
Important Is a Neuron?", with the protocol this project fixed where the paper is silent
(see ``docs/feature-selection.md``):

1. Split the labelled examples per class into a *selection* part and an *evaluation* part.
2. On the selection part only, compute each measure for every example, explaining the logit of
   the example's own label; average it (signed) per class; keep each class's top-k units.
3. Pool the kept units of all classes (their union).
4. Features of an example: the pooled units' activations, averaged over spatial positions for
   channel units. Fit a multinomial logistic regression on the selection part and report its
   accuracy on the evaluation part.
5. Do the same with the same number of units drawn at random (several seeds), as the floor.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union, cast

import numpy as np
import torch
from torch import nn

from .errors import ConductanceError
from .forward_args import ForwardArgs
from .layers import LayerSpec, resolve_layers
from .progress import Progress, check_progress
from .result import ResultProtocol, pandas
from .sites import record, warn_training

#: Measures that ``feature_selection`` knows how to ask ``layer_importance`` for.
KNOWN_MEASURES = ("conductance", "activation", "gradient", "grad_x_activation", "internal_influence",
                  "layer_integrated_gradients")
DEFAULT_MEASURES = ("conductance", "activation", "grad_x_activation", "internal_influence")
DEFAULT_KS = (1, 2, 5, 10, 20)
#: Name of the random-units rows in the table.
RANDOM = "random"
#: Keyword arguments that feature_selection sets itself and that importance_kwargs may not override.
_RESERVED = {"target": "the target is each example's label",
             "units": "pass units= to feature_selection",
             "measure": "pass measures= to feature_selection",
             "inputs": "pass the inputs positionally", "layers": "pass layer= to feature_selection"}


def _sklearn():
    """Import the pieces of scikit-learn used here, with a message naming the extra if it is missing."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("conductance.feature_selection trains a logistic regression with scikit-learn, "
                          "which is not installed: pip install scikit-learn (or pip install "
                          "'conductance[test]')") from exc
    return LogisticRegression, StandardScaler


# --------------------------------------------------------------------------------------------------
# result

@dataclass(eq=False)
class FeatureSelectionResult(ResultProtocol):
    """Held-out accuracy of a classifier on the units each measure selects.

    Attributes
    ----------
    rows : list of dict
        The tidy table, one row per (measure, k): ``measure``, ``k``, ``n_units`` (pooled units
        over classes), ``accuracy`` (on the evaluation split), ``std`` (0 for a measure, the
        standard deviation over seeds for random units), and for measure rows ``random_accuracy``
        / ``random_std``: random units of the same number. Random rows (``measure == "random"``)
        carry ``n_seeds``; there is one per distinct (k, n_units) that a measure produced.
    layer, units : the layer studied and the kind of unit ("channel" or "neuron").
    measures, ks : what was compared.
    classes : list of the class labels, in the order of ``class_scores`` rows.
    n_layer_units : number of units in the layer.
    selected : dict measure -> dict k -> list of int
        The pooled unit indices (sorted) each measure kept at each k.
    class_scores : dict measure -> Tensor (n_classes, n_layer_units)
        Mean signed measure per class over the selection split (the ranking).
    select_index, evaluate_index : LongTensor
        Indices into the inputs of the two splits.
    all_units_accuracy : float
        Held-out accuracy with every unit of the layer as a feature (a ceiling for reference).
    random_seeds, seed : the seeds used.
    importance : dict
        Settings of the importance runs (the ``importance_kwargs`` given, batch size).
    """

    rows: list[dict]
    layer: str
    units: str
    measures: tuple[str, ...]
    ks: tuple[int, ...]
    classes: list
    n_layer_units: int
    selected: dict[str, dict[int, list[int]]]
    class_scores: dict[str, torch.Tensor]
    select_index: torch.Tensor
    evaluate_index: torch.Tensor
    all_units_accuracy: float
    random_seeds: int
    seed: int
    importance: dict = field(default_factory=dict)

    FORMAT: ClassVar[str] = "conductance.feature_selection/1"

    def _layer_names(self) -> list[str]:
        return [self.layer]

    def summary(self) -> str:
        """The plain-text table (:meth:`format_table`).

        Returns
        -------
        str
        """
        return self.format_table()

    def top(self, k: int = 5, layer: Union[str, nn.Module, None] = None, *, measure: Optional[str] = None,
            random: bool = False) -> list[dict]:
        """The ``k`` rows with the highest held-out accuracy (ties: fewer units first).

        A feature selection studies one layer: ``layer`` may only name it (or be None).
        ``measure``: only that measure's rows; ``random=True`` includes the random-unit rows.

        Parameters
        ----------
        k : int
            Number of rows.
        layer : str, nn.Module or None
            The studied layer, or None.
        measure : str, optional
        random : bool

        Returns
        -------
        list of dict
            Rows as in :attr:`rows` (measure, k, n_units, accuracy, ...), best first.
        """
        if layer is not None and self._name_of(layer) != self.layer:
            raise ConductanceError(f"this result is of layer {self.layer!r} only, not {layer!r}")
        rows = [r for r in self.rows if (measure is None or r["measure"] == measure)
                and (random or measure == RANDOM or r["measure"] != RANDOM)]
        if measure is not None and not rows:
            raise ConductanceError(f"no rows for measure {measure!r}; measures {list(self.measures)} and 'random'")
        return [dict(r) for r in sorted(rows, key=lambda r: (-r["accuracy"], r["n_units"]))[:int(k)]]

    def to_dataframe(self) -> Any:
        """The tidy table of :attr:`rows` as a pandas DataFrame, one row per (measure, k). Needs pandas.

        Returns
        -------
        pandas.DataFrame
        """
        pd = pandas()
        columns = ["measure", "k", "n_units", "accuracy", "std", "random_accuracy", "random_std", "n_seeds"]
        frame = pd.DataFrame([dict(r) for r in self.rows])
        return frame[[c for c in columns if c in frame] + [c for c in frame if c not in columns]]

    def plot(self, ax: Any = None, title: Optional[str] = None, **kwargs: Any) -> Any:
        """Held-out accuracy against k, one line per measure, and the random units of the same number
        (matched to conductance, or to the first measure) as the mean over seeds (dashed), with the all-units
        accuracy as a dotted line. ``kwargs`` go to every ``ax.plot`` (e.g. ``color="red"``).
        Returns the matplotlib Figure (no pyplot figure left open).

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Draw there instead of on a new figure.
        title : str, optional
        **kwargs
            Line keywords.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from .plots import curves

        ks = np.asarray(self.ks, dtype=float)
        series: dict[str, Any] = {m: (ks, [self.accuracy(m, k) for k in self.ks]) for m in self.measures}
        styles: dict[str, dict] = {}
        if self.random_seeds:
            try:
                rand = [self.row(RANDOM, k) for k in self.ks]
            except KeyError:
                rand = []
            if rand:
                name = f"random units (mean of {self.random_seeds} seeds)"
                series[name] = (ks, [r["accuracy"] for r in rand])
                styles[name] = {"linestyle": "--"}
        if title is None:
            title = f"feature selection on {self.layer!r} ({self.units}s; all {self.n_layer_units} units: " \
                    f"{self.all_units_accuracy:.3f})"
        fig = curves(series, "k (top units per class)", "held-out accuracy", ax=ax, title=title, styles=styles,
                     markers=True, **kwargs)
        fig.axes[0].axhline(self.all_units_accuracy, color="black", linestyle=":", linewidth=0.8)
        return fig

    def row(self, measure: str, k: int) -> dict:
        """The row of ``measure`` at ``k``; for ``measure="random"`` the row matched to conductance
        (or to the first measure when conductance was not compared).

        Parameters
        ----------
        measure : str
            A compared measure, or ``"random"``.
        k : int
            Units per class.

        Returns
        -------
        dict
        """
        if measure == RANDOM:
            ref = "conductance" if "conductance" in self.measures else self.measures[0]
            n = self.row(ref, k)["n_units"]
            for r in self.rows:
                if r["measure"] == RANDOM and r["k"] == k and r["n_units"] == n:
                    return r
            raise KeyError(f"no random row at k={k}")
        for r in self.rows:
            if r["measure"] == measure and r["k"] == k:
                return r
        raise KeyError(f"no row for measure={measure!r}, k={k}; measures {list(self.measures)}, "
                       f"ks {list(self.ks)}")

    def accuracy(self, measure: str, k: int) -> float:
        """Held-out accuracy of ``measure`` (or ``"random"``) at ``k``.

        Parameters
        ----------
        measure : str
        k : int

        Returns
        -------
        float
            In [0, 1].
        """
        return self.row(measure, k)["accuracy"]

    def to_dict(self) -> dict:
        """Plain Python types only (JSON-serialisable).

        Returns
        -------
        dict
        """
        return {
            "layer": self.layer, "units": self.units, "measures": list(self.measures), "ks": list(self.ks),
            "classes": [_plain(c) for c in self.classes], "n_layer_units": self.n_layer_units,
            "n_select": int(self.select_index.numel()), "n_evaluate": int(self.evaluate_index.numel()),
            "all_units_accuracy": self.all_units_accuracy, "random_seeds": self.random_seeds,
            "seed": self.seed, "rows": [dict(r) for r in self.rows],
            "selected": {m: {str(k): list(v) for k, v in d.items()} for m, d in self.selected.items()},
            "importance": {k: _plain(v) for k, v in self.importance.items()},
        }

    def format_table(self, digits: int = 3) -> str:
        """A plain-text table: per measure and k, the pooled units, accuracy and random units of the
        same number (mean ± std over seeds).

        Parameters
        ----------
        digits : int
            Decimals of the accuracies.

        Returns
        -------
        str
        """
        header = ["measure", "k", "units", "accuracy", f"random (mean ± std, {self.random_seeds} seeds)"]
        body = []
        for r in self.rows:
            if r["measure"] == RANDOM:
                continue
            rnd = ("-" if r.get("random_accuracy") is None
                   else f"{r['random_accuracy']:.{digits}f} ± {r['random_std']:.{digits}f}")
            body.append([r["measure"], str(r["k"]), str(r["n_units"]), f"{r['accuracy']:.{digits}f}", rnd])
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        def line(cells: Sequence[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [f"feature selection on {self.layer!r} ({self.units} units, {self.n_layer_units} in the layer; "
               f"{self.select_index.numel()} selection / {self.evaluate_index.numel()} evaluation examples, "
               f"{len(self.classes)} classes)",
               line(header), line(["-" * w for w in widths])]
        out += [line(b) for b in body]
        out.append(f"all {self.n_layer_units} units: {self.all_units_accuracy:.{digits}f}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"FeatureSelectionResult(\n{self.format_table()}\n)"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# --------------------------------------------------------------------------------------------------
# checks and the split

def _check_labels(labels: Any, n: int) -> torch.Tensor:
    if isinstance(labels, (np.ndarray, list, tuple)):
        labels = torch.as_tensor(np.asarray(labels))
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, array or list of class indices, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise ConductanceError(f"labels must be one class index per example, shape ({n},); got shape "
                               f"{tuple(labels.shape)}" + (" (one-hot labels? pass labels.argmax(1))"
                                                           if labels.dim() == 2 else ""))
    if labels.shape[0] != n:
        raise ConductanceError(f"labels has {labels.shape[0]} entries but inputs has {n} examples; "
                               "give one label per example")
    if labels.is_floating_point() or labels.is_complex():
        if not torch.equal(labels, labels.round()):
            raise ConductanceError("labels must be integer class indices, got non-integer values")
    elif labels.dtype == torch.bool:
        raise ConductanceError("labels must be integer class indices, got booleans")
    labels = labels.detach().cpu().long()
    if (labels < 0).any():
        raise ConductanceError("labels must be non-negative class indices (they are the logits explained)")
    return labels


def _check_measures(measures: Union[str, Sequence[str]]) -> tuple[str, ...]:
    if isinstance(measures, str):
        measures = (measures,)
    measures = tuple(measures)
    if not measures:
        raise ConductanceError(f"measures is empty; choose some of {KNOWN_MEASURES}")
    for m in measures:
        if m == RANDOM:
            raise ConductanceError("random units are always compared (random_seeds sets how many draws); "
                                   f"leave 'random' out of measures, which are chosen from {KNOWN_MEASURES}")
        if m not in KNOWN_MEASURES:
            raise ConductanceError(f"unknown measure {m!r}; choose from {KNOWN_MEASURES}")
    if len(set(measures)) != len(measures):
        raise ConductanceError(f"measures lists a measure twice: {list(measures)}")
    return measures


def _check_ks(ks: Union[int, Sequence[int]]) -> tuple[int, ...]:
    ks = (int(ks),) if isinstance(ks, numbers.Integral) else tuple(cast(Sequence[int], ks))
    if not ks:
        raise ConductanceError("ks is empty; give the numbers of units to keep per class, e.g. (1, 2, 5)")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ConductanceError(f"every k must be a positive integer (units kept per class), got {k!r}")
    return tuple(sorted({int(k) for k in ks}))


def stratified_split(labels: torch.Tensor, select_fraction: float = 0.6, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split example indices per class: ``round(select_fraction * n_c)`` of each class's ``n_c``
    examples (at least one, and leaving at least one) go to selection, the rest to evaluation.

    The paper's "about 30 select / 20 evaluate per class" is ``select_fraction=0.6`` with 50
    examples per class. The draw is seeded by ``seed``; both outputs are sorted.

    Parameters
    ----------
    labels : LongTensor, shape (n,)
        Class of each example.
    select_fraction : float
        In (0, 1).
    seed : int

    Returns
    -------
    select, evaluate : LongTensor, shapes (n_select,) and (n - n_select,)
        Example indices.
    """
    if isinstance(select_fraction, bool) or not isinstance(select_fraction, numbers.Real) \
            or not 0 < select_fraction < 1:
        raise ConductanceError(f"select_fraction must be a number strictly between 0 and 1, got {select_fraction!r}")
    rng = np.random.default_rng(seed)
    select, evaluate = [], []
    classes, counts = torch.unique(labels, return_counts=True)
    for c, n in zip(classes.tolist(), counts.tolist()):
        if n < 2:
            raise ConductanceError(f"class {c} has {n} example; each class needs at least 2 to split into "
                                   "selection and evaluation (add examples or drop the class)")
        idx = (labels == c).nonzero().flatten().numpy()
        idx = idx[rng.permutation(len(idx))]
        m = min(n - 1, max(1, int(round(select_fraction * n))))
        select.append(idx[:m])
        evaluate.append(idx[m:])
    return (torch.as_tensor(np.sort(np.concatenate(select))).long(),
            torch.as_tensor(np.sort(np.concatenate(evaluate))).long())


def _check_split(split: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        select, evaluate = split
    except (TypeError, ValueError):
        raise ConductanceError("split must be a pair (selection indices, evaluation indices)") from None
    n = labels.shape[0]
    out = []
    for name, idx in (("selection", select), ("evaluation", evaluate)):
        idx = torch.as_tensor(np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx))
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise ConductanceError(f"the {name} mask has shape {tuple(idx.shape)}; a mask needs ({n},)")
            idx = idx.nonzero().flatten()
        if idx.dim() != 1 or idx.is_floating_point():
            raise ConductanceError(f"the {name} split must be a 1-D list of integer indices or a boolean mask")
        idx = idx.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ConductanceError(f"the {name} split has indices outside [0, {n})")
        if torch.unique(idx).numel() != idx.numel():
            raise ConductanceError(f"the {name} split repeats an index")
        out.append(torch.sort(idx).values)
    select, evaluate = out
    if np.intersect1d(select.numpy(), evaluate.numpy()).size:
        raise ConductanceError("the selection and evaluation splits share examples; they must be disjoint")
    if select.numel() == 0 or evaluate.numel() == 0:
        raise ConductanceError("both the selection and the evaluation split need examples")
    return select, evaluate


# --------------------------------------------------------------------------------------------------
# running the model

def _slice_baselines(baselines: Any, inputs: torch.Tensor, idx: torch.Tensor) -> Any:
    if isinstance(baselines, torch.Tensor) and baselines.dim() == inputs.dim() \
            and baselines.shape[0] == inputs.shape[0] and inputs.shape[0] > 1:
        return baselines[idx.to(baselines.device)]
    return baselines


def layer_activations(model: nn.Module, inputs: torch.Tensor, layer: LayerSpec, *, units: str = "channel",
                      batch_size: int = 256, additional_forward_args: Any = None,
                      forward_kwargs: Optional[dict] = None, attribute_to_layer_input: bool = False
                      ) -> torch.Tensor:
    """Activations of one layer for every example, from no-grad forwards in batches.

    Returns (batch, n_units), on the CPU: for ``units="channel"`` each channel's mean over every
    dimension after the channel dimension (a dense layer's activation is returned as it is), for
    ``units="neuron"`` the layer's value flattened.

    Parameters
    ----------
    model : nn.Module
    inputs : Tensor, shape (batch, *input_shape)
    layer : a layer name, module or ``(name, element)`` pair
    units : str
        ``"channel"`` or ``"neuron"``.
    batch_size : int
        Examples per forward pass.
    additional_forward_args, forward_kwargs, attribute_to_layer_input
        As in :func:`conductance.layer_conductance`.

    Returns
    -------
    Tensor, shape (batch, n_units)
    """
    if units not in ("channel", "neuron"):
        raise ConductanceError(f"unknown units {units!r}; choose 'channel' or 'neuron'")
    refs = resolve_layers(model, layer, attribute_to_layer_input)
    if len(refs) != 1:
        raise ConductanceError("layer_activations reads one layer at a time")
    ref = refs[0]
    n = inputs.shape[0]
    fargs = ForwardArgs.make(additional_forward_args, forward_kwargs, n)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            args, kw = fargs.at(idx)
            with record(model, ref, need="feature selection") as rec:
                model(inputs[idx.to(inputs.device)], *args, **kw)
            rec.require()
            value = rec.values[ref.name].float()
            if units == "channel" and value.dim() > 2:
                value = value.flatten(2).mean(2)
            chunks.append(value.flatten(1).cpu())
    return torch.cat(chunks)


def _importance(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                layer_name: str, layer: Any, measures: tuple[str, ...], units: str, kwargs: dict,
                batch_size: int, progress: Optional[bool] = None) -> dict[str, torch.Tensor]:
    """Per-example measures (len(index), n_units) on ``layer`` for the examples ``index``, each
    explaining its own label, in batches. Every measure comes from the same call, so the path
    measures share one run of the path."""
    import conductance as cd  # through the package, so the current layer_importance is used

    layer_importance = getattr(cd, "layer_importance", None)
    if layer_importance is None:
        raise ConductanceError("this version of conductance has no layer_importance, which "
                               "feature_selection uses to compute the measures")
    n = inputs.shape[0]
    out: dict[str, list[torch.Tensor]] = {m: [] for m in measures}
    with Progress(progress, index.numel(), f"feature selection: {', '.join(measures)}", "examples") as bar:
        for start in range(0, index.numel(), batch_size):
            _importance_batch(model, inputs, labels, index[start:start + batch_size], layer_name, layer, measures,
                              units, kwargs, n, layer_importance, out)
            bar.update(min(batch_size, index.numel() - start))
    return {m: torch.cat(v) for m, v in out.items()}


def _importance_batch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                      layer_name: str, layer: Any, measures: tuple[str, ...], units: str, kwargs: dict, n: int,
                      layer_importance: Any, out: dict[str, list[torch.Tensor]]) -> None:
    """One batch of :func:`_importance`, appended to ``out``."""
    kw = dict(kwargs)
    if "baselines" in kw:
        kw["baselines"] = _slice_baselines(kw["baselines"], inputs, idx)
    if "additional_forward_args" in kw or "forward_kwargs" in kw:
        # this batch's rows of the per-example arguments; shared() ones stay wrapped for layer_importance
        fargs = ForwardArgs.make(kw.pop("additional_forward_args", None), kw.pop("forward_kwargs", None), n,
                                 warn_ambiguous=False)
        kw.update(fargs.subset(idx).keywords())
    x = inputs[idx.to(inputs.device)]
    target = labels[idx].to(inputs.device)
    result = layer_importance(model, x, layer, measure=list(measures), target=target, units=units, **kw)
    if isinstance(result, Mapping) and set(result) == set(measures) \
            and all(isinstance(v, Mapping) for v in result.values()):
        pass
    elif len(measures) == 1 and isinstance(result, Mapping) and layer_name in result:
        result = {measures[0]: result}  # a single result for a one-element list
    else:
        raise ConductanceError(f"layer_importance returned a {type(result).__name__}; expected one "
                               f"result per measure {list(measures)}")
    for m in measures:
        out[m].append(result[m][layer_name].detach().float().flatten(1).cpu())


# --------------------------------------------------------------------------------------------------
# selection and classification

def top_units(class_scores: torch.Tensor, k: int) -> list[int]:
    """Union over classes of each class's ``k`` highest-scoring units (sorted unit indices).

    ``class_scores`` is (n_classes, n_units); ties are broken by the lower unit index.

    Parameters
    ----------
    class_scores : Tensor, shape (n_classes, n_units)
    k : int
        Units per class.

    Returns
    -------
    list of int
        Between ``k`` and ``n_classes * k`` unit indices, increasing.
    """
    order = torch.sort(-class_scores, dim=1, stable=True).indices[:, :k]
    return sorted(set(order.flatten().tolist()))


def _fit_score(features: np.ndarray, y: np.ndarray, select: np.ndarray, evaluate: np.ndarray,
               columns: Sequence[int], classifier_kwargs: dict) -> float:
    LogisticRegression, StandardScaler = _sklearn()
    X_sel, X_eval = features[select][:, columns], features[evaluate][:, columns]
    scaler = StandardScaler().fit(X_sel)
    clf = LogisticRegression(**classifier_kwargs)
    with _one_blas_thread():
        clf.fit(scaler.transform(X_sel), y[select])
    return float((clf.predict(scaler.transform(X_eval)) == y[evaluate]).mean())


def _one_blas_thread():
    """These fits are small: a multi-threaded BLAS spends more time synchronising than computing
    (8x slower on a loaded two-core machine), so run them on one BLAS thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def feature_selection(model: nn.Module, inputs: torch.Tensor, labels: Any, layer: LayerSpec, *,
                      measures: Union[str, Sequence[str]] = DEFAULT_MEASURES,
                      ks: Union[int, Sequence[int]] = DEFAULT_KS, select_fraction: float = 0.6,
                      split: Optional[tuple[Any, Any]] = None, units: str = "channel", random_seeds: int = 5,
                      importance_kwargs: Optional[dict] = None, seed: int = 0, batch_size: int = 64,
                      classifier_kwargs: Optional[dict] = None, progress: Optional[bool] = None
                      ) -> FeatureSelectionResult:
    """Accuracy of a classifier restricted to the units each measure finds most important per class.

    Parameters
    ----------
    model : nn.Module
        A classifier whose output is (batch, classes) logits; put it in ``eval()`` mode.
    inputs : Tensor (n, ...)
        Labelled examples not used to train the model (the paper uses validation images).
    labels : LongTensor, array or list (n,)
        Class index of each example. It is also the logit each measure explains.
    layer : str or nn.Module
        One layer (any spec that ``cd.layer_conductance`` accepts).
    measures : str or sequence of str
        Any of ``"conductance"``, ``"activation"``, ``"gradient"``, ``"grad_x_activation"``,
        ``"internal_influence"``, ``"layer_integrated_gradients"``. Random units are always added.
    ks : int or sequence of int
        Units kept per class (before pooling over classes). Each must be at most the number of
        units in the layer.
    select_fraction : float
        Share of each class's examples used to rank units and fit the classifier; the rest
        evaluates. Ignored when ``split`` is given.
    split : (indices, indices), optional
        Explicit selection and evaluation examples (integer indices or boolean masks).
    units : {"channel", "neuron"}
        "channel": a unit is a channel (filter); its feature is its activation averaged over
        positions, its measure summed over positions. "neuron": every element of the layer.
    random_seeds : int
        Random draws of units per pooled size (mean and std reported); 0 skips the random rows.
    importance_kwargs : dict, optional
        Passed to ``cd.layer_importance`` (baselines, n_steps, method, tolerance,
        internal_batch_size, additional_forward_args, forward_kwargs, ...). Per-example tensors
        (first dimension n) are sliced with their batch.
    seed : int
        Seed of the split and of the random units.
    batch_size : int
        Examples per ``layer_importance`` call and per activation forward.
    classifier_kwargs : dict, optional
        Overrides for ``sklearn.linear_model.LogisticRegression`` (default ``max_iter=2000``).
        Features are standardised with statistics of the selection split.
    progress : bool, optional
        A bar (tqdm) counting the selection examples whose measures are computed, on stderr;
        default: when stderr is a terminal and tqdm is installed.

    Returns
    -------
    FeatureSelectionResult
        ``rows`` (the tidy table), ``format_table()``, ``to_dict()``, ``accuracy(measure, k)``.
    """
    _sklearn()  # fail early, before any model run
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (n, ...), got {type(inputs).__name__}")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ConductanceError(f"inputs must have a batch dimension with examples; got shape {tuple(inputs.shape)}")
    n = inputs.shape[0]
    labels = _check_labels(labels, n)
    measures = _check_measures(measures)
    check_progress(progress)
    ks = _check_ks(ks)
    if units not in ("channel", "neuron"):
        raise ConductanceError(f"unknown units {units!r}; choose 'channel' (filters, spatially averaged "
                               "activations) or 'neuron'")
    if isinstance(random_seeds, bool) or not isinstance(random_seeds, numbers.Integral) or random_seeds < 0:
        raise ConductanceError(f"random_seeds must be a non-negative integer, got {random_seeds!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ConductanceError(f"batch_size must be a positive integer, got {batch_size!r}")
    kwargs = dict(importance_kwargs or {})
    for key, why in _RESERVED.items():
        if key in kwargs:
            raise ConductanceError(f"importance_kwargs may not set {key!r}: {why}")
    # the path settings, checked once before any model runs (each batch's call would check them again late)
    from .request import KEYWORDS, Request
    Request.make(units=units, **{k: v for k, v in kwargs.items() if k in KEYWORDS})
    if isinstance(layer, (list, tuple)) and not (len(layer) == 2 and isinstance(layer[1], (int, str))
                                                 and isinstance(layer[0], (str, nn.Module))):
        if len(layer) != 1:
            raise ConductanceError("feature_selection studies one layer at a time; call it once per layer")
        layer = layer[0]
    (ref,) = resolve_layers(model, layer, kwargs.get("attribute_to_layer_input", False))
    warn_training(model, "the activations and measures")

    select, evaluate = (stratified_split(labels, select_fraction, seed) if split is None
                        else _check_split(split, labels))
    classes = torch.unique(labels[select]).tolist()
    if len(classes) < 2:
        raise ConductanceError("the selection split holds a single class; a classifier needs at least two")
    missing = sorted(set(torch.unique(labels[evaluate]).tolist()) - set(classes))
    if missing:
        raise ConductanceError(f"classes {missing} appear only in the evaluation split; the classifier "
                               "cannot predict classes it never saw")

    # features: one no-grad pass over every example
    features_t = layer_activations(model, inputs, layer, units=units, batch_size=batch_size,
                                   additional_forward_args=kwargs.get("additional_forward_args"),
                                   forward_kwargs=kwargs.get("forward_kwargs"),
                                   attribute_to_layer_input=kwargs.get("attribute_to_layer_input", False))
    n_layer_units = features_t.shape[1]
    too_big = [k for k in ks if k > n_layer_units]
    if too_big:
        raise ConductanceError(f"k={too_big} is larger than the {n_layer_units} {units} units of layer "
                               f"{ref.name!r}; use ks at most {n_layer_units}")

    # measures: once per selection example, every measure from the same call
    scores = _importance(model, inputs, labels, select, ref.name, layer, measures, units, kwargs, batch_size,
                         progress)
    for m, s in scores.items():
        if s.shape[1] != n_layer_units:
            raise ConductanceError(f"measure {m!r} has {s.shape[1]} units per example on {ref.name!r} but "
                                   f"the layer's activations give {n_layer_units} with units={units!r}")
    y_sel = labels[select]
    class_scores = {m: torch.stack([s[y_sel == c].mean(0) for c in classes]) for m, s in scores.items()}

    # classifiers
    features = features_t.double().numpy()
    y = labels.numpy()
    sel_np, eval_np = select.numpy(), evaluate.numpy()
    clf_kwargs = {"max_iter": 2000, **(classifier_kwargs or {})}
    def fit(cols: Sequence[int]) -> Any:
        return _fit_score(features, y, sel_np, eval_np, list(cols), clf_kwargs)

    random_cache: dict[int, list[float]] = {}

    def random_accuracies(size: int) -> list[float]:
        if size not in random_cache:
            random_cache[size] = [
                fit(np.sort(np.random.default_rng([seed, s, size]).choice(n_layer_units, size, replace=False)))
                for s in range(random_seeds)]
        return random_cache[size]

    rows: list[dict] = []
    selected: dict[str, dict[int, list[int]]] = {m: {} for m in measures}
    random_rows: dict[tuple[int, int], dict] = {}
    for m in measures:
        for k in ks:
            chosen = top_units(class_scores[m], k)
            selected[m][k] = chosen
            row = {"measure": m, "k": k, "n_units": len(chosen), "accuracy": fit(chosen), "std": 0.0,
                   "random_accuracy": None, "random_std": None}
            if random_seeds:
                accs = random_accuracies(len(chosen))
                same = len(set(accs)) == 1  # e.g. every unit drawn: keep the mean exact, the std 0
                row["random_accuracy"] = accs[0] if same else float(np.mean(accs))
                row["random_std"] = 0.0 if same else float(np.std(accs))
                random_rows[(k, len(chosen))] = {"measure": RANDOM, "k": k, "n_units": len(chosen),
                                                 "accuracy": row["random_accuracy"], "std": row["random_std"],
                                                 "n_seeds": random_seeds}
            rows.append(row)
    rows += [random_rows[key] for key in sorted(random_rows)]
    return FeatureSelectionResult(
        rows=rows, layer=ref.name, units=units, measures=measures, ks=ks, classes=classes,
        n_layer_units=n_layer_units, selected=selected, class_scores=class_scores, select_index=select,
        evaluate_index=evaluate, all_units_accuracy=fit(range(n_layer_units)), random_seeds=random_seeds,
        seed=seed, importance={**{k: (v if v is None or isinstance(v, (bool, int, float, str)) else "given")
                                  for k, v in kwargs.items()}, "batch_size": batch_size}).bind(model)
