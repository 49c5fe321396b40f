"""The adaptive rule: refine each example's path until every requested layer's unit values are accurate.

Each example's grid is a set of *pairs*: an interval ``[a0, a1]`` together with its midpoint ``am``.
The trapezoid rule over the two halves gives the unit values; the difference between the rule on the
whole interval and on its halves, ``e = T(a0, a1) - T(a0, am) - T(am, a1)``, is a vector over the
layer's units that says how much the values still move when the grid is halved. Summed (with signs)
over the pairs, it is the per-unit error estimate that :func:`conductance.engine.unit_error` reads.

Refinement bisects both halves of the pairs with the largest ``||e||`` (relative to the layer's
values) or the largest completeness residual on a cut layer, two new points per pair, the new points
of all unfinished examples sent through the model together. Every point is evaluated once; each
point's layer values and gradients are kept until its example is finished. The values and the
coarse-grid values are running sums per example (one of each per layer and measure, at the size of
the units), so steering needs one number per pair and layer, never a stored per-unit vector.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch

from . import engine
from .engine import Integral, IntervalMeasure, PathProblem, Scratch, _chunks
from .paths import gauss_legendre_nodes

#: Each refinement round bisects an example's worst pairs until they hold this share of its total score
#: (measured on EfficientNet-Lite0 with the completeness-driven rule: 0.3 beat 0.5 and 0.8).
REFINE_SHARE = 0.3
#: A low-precision model's example stops refining when its estimate has not fallen below this share
#: of its best after the points doubled: rounding, not the grid, sets its error.
STALL_RATIO = 0.8

Pair = tuple[int, int, int]


@dataclass
class _Example:
    """One example's refined grid."""

    ids: list                                                 # store index of each point, in path order
    pairs: dict = field(default_factory=dict)                 # (id0, mid, id1) -> ||e|| per steering site
    residuals: dict = field(default_factory=dict)             # (id0, id1) -> residual per cut layer
    best: tuple = (float("inf"), 0)                           # (lowest estimate so far, points then)
    precision_limited: bool = False


class AdaptiveIntegrator:
    """State of one adaptive run; :meth:`run` returns the :class:`~conductance.engine.Integral`.

    Parameters
    ----------
    measures : measure name -> interval function; every one of them steers refinement.
    units : "neuron", "channel" or "element" (the engine's unit reduction).
    cut_layers : names whose completeness error must meet the tolerance.
    unit_layers : names whose per-unit estimate must meet the tolerance.
    tolerance : relative error to reach, per example, per unit layer and per cut layer.
    max_points : budget of path points per example.
    initial_steps : pairs of the starting grid (``2 * initial_steps + 1`` points).
    store_bytes : memory budget for stored points.
    unit_floor : conductance values are measured against ``max(||values||, unit_floor * |F(x)-F(x')|)``.
    refine_share : each round bisects an example's worst pairs until they hold this share of its score.
    """

    def __init__(self, problem: PathProblem, measures: dict[str, IntervalMeasure], units: str,
                 cut_layers: Sequence[str], unit_layers: Sequence[str], tolerance: float, max_points: int,
                 initial_steps: int, store_bytes: int, unit_floor: float,
                 refine_share: float = REFINE_SHARE) -> None:
        self.problem = problem
        self.refine_share = refine_share
        self.measures = measures
        self.units = units
        self.names = problem.layer_names
        self.cut_layers = list(cut_layers)
        self.sites = [(m, n) for n in unit_layers for m in measures]
        self.tolerance = tolerance
        self.max_points = max_points
        self.initial_steps = max(1, min(initial_steps, (max_points - 1) // 2))
        self.store_bytes = store_bytes
        self.unit_floor = unit_floor
        self.device = problem.inputs.device
        self.scratch = Scratch()
        # every evaluated point, by store index: its position, F, each layer's value and gradient
        self.alpha: list[float] = []
        self.F: list[float] = []
        self.y: dict[str, list[Optional[torch.Tensor]]] = {n: [] for n in self.names}
        self.g: dict[str, list[Optional[torch.Tensor]]] = {n: [] for n in self.names}
        self.stored = 0
        self.memory_limited = False
        # interval sums kept when units shrink the layer (channels): (id0, id1, layer) -> {measure: units}
        self.kept: dict[tuple, dict[str, torch.Tensor]] = {}
        # running sums per measure and layer, (batch, *unit_shape) in float64: the rule on the fine
        # grid (values) and on the grid without the pairs' midpoints (coarse)
        self.values: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
        self.coarse: dict[str, dict[str, torch.Tensor]] = {m: {} for m in measures}
        self.examples: list[_Example] = []
        #: per steering site and example, ||values|| and ||coarse - values|| as of the last :meth:`read_back`
        self.site_norms = np.zeros((2, len(self.sites), 0))

    # -- points ---------------------------------------------------------------------------------

    def evaluate(self, points: list[tuple[int, float]]) -> list[int]:
        """Evaluate ``(example, alpha)`` points in chunks and store them; returns their store indices.

        Parameters
        ----------
        points : list of (int, float)
            Example index and path position of each point.

        Returns
        -------
        list of int
            Store index of each point, in the order given.
        """
        ids = []
        for start, stop in _chunks(len(points), self.problem.chunk_size):
            part = points[start:stop]
            ex = torch.tensor([p[0] for p in part], device=self.device)
            al = torch.tensor([p[1] for p in part], dtype=torch.float64, device=self.device)
            pts = engine.evaluate(self.problem, ex, al)   # looked up at call time (benchmarks time it)
            self.F.extend(pts.F.double().tolist())
            for j, (_, a) in enumerate(part):
                ids.append(len(self.alpha))
                self.alpha.append(a)
                for n in self.names:
                    self.y[n].append(pts.ys[n][j:j + 1])
                    self.g[n].append(pts.gs[n][j:j + 1])
            self.stored += sum(2 * pts.ys[n].numel() * pts.ys[n].element_size() for n in self.names)
        return ids

    def stored_point(self, layer: str, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A stored point's value and gradient of one layer, each (1, *layer_shape).

        Parameters
        ----------
        layer : str
        pid : int
            Store index.

        Returns
        -------
        y, g : Tensor, shape (1, *layer_shape)
        """
        y, g = self.y[layer][pid], self.g[layer][pid]
        assert y is not None and g is not None, "a finished example's points were asked for"
        return y, g

    def point_bytes(self, pid: int) -> int:
        """Bytes one stored point holds: value and gradient of every layer.

        Parameters
        ----------
        pid : int
            Store index.

        Returns
        -------
        int
        """
        return sum(2 * y.numel() * y.element_size() for y, _ in (self.stored_point(n, pid) for n in self.names))

    # -- interval sums --------------------------------------------------------------------------

    def keeps(self, y: torch.Tensor) -> bool:
        """Whether an interval's unit sums are small enough to keep (channels of 8 or more elements).

        Parameters
        ----------
        y : Tensor, shape (1, *layer_shape)

        Returns
        -------
        bool
        """
        return self.units == "channel" and y.dim() > 2 and y.shape[2:].numel() >= 8

    def interval(self, layer: str, id0: int, id1: int) -> dict[str, torch.Tensor]:
        """Every measure's trapezoid sum over one interval of one layer, (*unit_shape) in float64.

        Parameters
        ----------
        layer : str
        id0, id1 : int
            Store indices of the interval's ends.

        Returns
        -------
        dict str -> Tensor, shape (*unit_shape), float64
        """
        key = (id0, id1, layer)
        known = self.kept.get(key)
        if known is not None:
            return known
        (y0, g0), (y1, g1) = self.stored_point(layer, id0), self.stored_point(layer, id1)
        parts = engine.interval_contributions(self.measures, y0, g0, y1, g1, self.alpha[id1] - self.alpha[id0],
                                       "trapezoid", self.units, self.scratch)
        # gathered on the inputs' device (layers of a model split over devices live elsewhere)
        # a copy: the parts may be views of the scratch buffers, which the next interval overwrites
        sums = {m: c[0].to(device=self.device, dtype=torch.float64, copy=True) for m, c in parts.items()}
        if self.keeps(y0):
            self.kept[key] = sums
        return sums

    def residual(self, id0: int, id1: int, sums: dict[str, dict[str, torch.Tensor]]) -> Union[np.ndarray, torch.Tensor]:
        """Completeness residual of one interval on every cut layer: its units' sum minus F's change.

        Parameters
        ----------
        id0, id1 : int
            Store indices of the interval's ends.
        sums : dict measure -> dict layer -> Tensor, shape (*unit_shape)
            The interval's sums, as :meth:`interval` gives them per layer.

        Returns
        -------
        Tensor (float64, on the inputs' device) or, without cut layers, ndarray; shape (len(cut_layers),)
        """
        change = self.F[id1] - self.F[id0]
        if not self.cut_layers:
            return np.zeros(0)
        # on the device (float64, as the sums) until the round's read_back(): no host sync per interval
        return torch.stack([sums[L]["conductance"].sum() for L in self.cut_layers]) - change

    def add(self, target: dict, e: int, layer: str, sums: dict[str, torch.Tensor], sign: float) -> None:
        """Add ``sign`` times one interval's sums to example ``e``'s row of ``target``.

        Parameters
        ----------
        target : dict measure -> dict layer -> Tensor, shape (batch, *unit_shape)
            Accumulators, created on first use.
        e : int
            Example index.
        layer : str
        sums : dict measure -> Tensor, shape (*unit_shape)
        sign : float
            +1 to add, -1 to take out (an interval replaced by its halves).
        """
        for m, s in sums.items():
            acc = target[m].get(layer)
            if acc is None:
                acc = torch.zeros((self.problem.batch_size,) + tuple(s.shape), dtype=torch.float64,
                                  device=self.device)
                target[m][layer] = acc
            acc[e].add_(s, alpha=sign)

    def layer_sums(self, intervals: Sequence[tuple[int, int]]) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The sums of several intervals (store-index pairs) for every layer, layer after layer.

        A pair's intervals share their points; summing all of a layer's intervals before moving to
        the next layer reads each point's values again while they are still in the cache (the sums
        are memory-bound: measured about 10% faster on GoogLeNet than interval after interval).

        Parameters
        ----------
        intervals : sequence of (int, int)
            Store indices of each interval's ends, consecutive ones first.

        Returns
        -------
        dict layer -> list of (dict measure -> Tensor, shape (*unit_shape), float64)
            In the order of ``intervals``.
        """
        return {n: [self.interval(n, a, b) for a, b in intervals] for n in self.names}

    def open_pair(self, e: int, pair: Pair, parent: dict, left: dict, right: dict) -> None:
        """Add a new pair's halves to the values and score it.

        Parameters
        ----------
        e : int
            Example index.
        pair : (int, int, int)
            Store indices of the pair's start, middle and end.
        parent, left, right : dict layer -> dict measure -> Tensor, shape (*unit_shape)
            The sums of the interval the pair replaces and of its two halves.
        """
        id0, mid, id1 = pair
        ex = self.examples[e]
        for n in self.names:
            self.add(self.values, e, n, left[n], 1.0)
            self.add(self.values, e, n, right[n], 1.0)
        ex.pairs[pair] = (torch.stack([(parent[n][m] - left[n][m] - right[n][m]).norm() for m, n in self.sites])
                          if self.sites else np.zeros(0))   # on the device until the round's read_back()
        ex.residuals[(id0, mid)] = self.residual(id0, mid, left)
        ex.residuals[(mid, id1)] = self.residual(mid, id1, right)

    # -- errors ---------------------------------------------------------------------------------

    def change(self, ex: _Example) -> float:
        """|F(x) - F(x')| of one example, guarded as in :func:`conductance.engine.relative_error`.

        Parameters
        ----------
        ex : _Example

        Returns
        -------
        float
        """
        F0, F1 = self.F[ex.ids[0]], self.F[ex.ids[-1]]
        return max(abs(F1 - F0), 1e-6 * max(abs(F1), abs(F0), 1.0))

    def norms(self, e: int) -> np.ndarray:
        """The norm each steering site's errors are measured against, per site.

        Parameters
        ----------
        e : int
            Example index.

        Returns
        -------
        ndarray, shape (n_sites,)
        """
        floor = self.unit_floor * self.change(self.examples[e])
        out = []
        for (m, _), norm in zip(self.sites, self.site_norms[0, :, e]):
            out.append(max(norm, floor) if m == "conductance" else norm)
        return np.maximum(np.asarray(out, dtype=np.float64), np.finfo(np.float64).tiny)

    def error(self, e: int) -> float:
        """The worst relative error of one example: per-unit estimates and completeness on cuts.

        Parameters
        ----------
        e : int
            Example index.

        Returns
        -------
        float
        """
        ex = self.examples[e]
        worst = 0.0
        if self.sites:
            diffs = self.site_norms[1, :, e]
            worst = float((diffs / self.norms(e)).max())
        if self.cut_layers:
            r = np.abs(np.stack(list(ex.residuals.values())).sum(0))
            worst = max(worst, float(r.max()) / self.change(ex))
        return worst

    def scores(self, e: int) -> list[tuple[float, Pair]]:
        """Every bisectable pair of one example with its score, worst first.

        Parameters
        ----------
        e : int
            Example index.

        Returns
        -------
        list of (float, (int, int, int))
            Score and pair (store indices of start, middle, end).
        """
        ex = self.examples[e]
        norms = self.norms(e) if self.sites else None
        change = self.change(ex)
        scored = []
        for pair, unit_e in ex.pairs.items():
            id0, mid, id1 = pair
            if self.alpha[id1] - self.alpha[id0] <= 2e-7:
                continue
            s = float((unit_e / norms).max()) if norms is not None else 0.0
            if self.cut_layers:
                r = np.abs(ex.residuals[(id0, mid)]) + np.abs(ex.residuals[(mid, id1)])
                s = max(s, float(r.max()) / change)
            scored.append((s, pair))
        scored.sort(key=lambda t: -t[0])
        return scored

    # -- the run --------------------------------------------------------------------------------

    def start_ends(self, n0: int) -> np.ndarray:
        """The ends of the starting grid's ``n0`` pairs: Gauss-Legendre nodes plus both ends of the path.

        Parameters
        ----------
        n0 : int
            Number of starting pairs.

        Returns
        -------
        ndarray, shape (n0 + 1,)
            Increasing positions from 0 to 1.
        """
        return np.concatenate([[0.0], gauss_legendre_nodes(n0 - 1), [1.0]]) if n0 > 1 else np.array([0.0, 1.0])

    def choose(self, e: int) -> list[Pair]:
        """The pairs of example ``e`` to bisect this round: its worst pairs, until they hold
        ``refine_share`` of its total score, within its budget of points.

        Parameters
        ----------
        e : int
            Example index.

        Returns
        -------
        list of (int, int, int)
            Worst first; empty when nothing is left that can be bisected.
        """
        scored = self.scores(e)
        total = sum(s for s, _ in scored)
        budget = (self.max_points - len(self.examples[e].ids)) // 2
        chosen: list[Pair] = []
        covered = 0.0
        for s, pair in scored:
            if len(chosen) >= budget or (chosen and covered >= self.refine_share * total):
                break
            chosen.append(pair)
            covered += s
        return chosen

    def start(self) -> None:
        """The starting grid of every example (:meth:`start_ends` and the midpoints)."""
        n0 = self.initial_steps
        B = self.problem.batch_size
        if self.problem.point_bytes:
            # the starting grid itself must fit the memory budget
            fits = (self.store_bytes // (B * self.problem.point_bytes) - 1) // 2
            n0 = max(1, min(n0, fits))
        ends = self.start_ends(n0)
        grid = np.empty(2 * n0 + 1)
        grid[0::2] = ends
        grid[1::2] = 0.5 * (ends[:-1] + ends[1:])
        ids = self.evaluate([(e, float(a)) for e in range(B) for a in grid])
        for e in range(B):
            own = ids[e * len(grid):(e + 1) * len(grid)]
            self.examples.append(_Example(ids=list(own)))
            for k in range(n0):
                pair = id0, mid, id1 = own[2 * k], own[2 * k + 1], own[2 * k + 2]
                sums = self.layer_sums([(id0, mid), (mid, id1), (id0, id1)])
                left, right, parent = ({n: sums[n][i] for n in self.names} for i in range(3))
                self.open_pair(e, pair, parent, left, right)
                for n in self.names:
                    self.add(self.coarse, e, n, parent[n], 1.0)
        self.read_back()

    def refine(self, proposals: dict[int, list[Pair]]) -> None:
        """Bisect both halves of each proposed pair (two new points each), all examples together.

        Parameters
        ----------
        proposals : dict int -> list of (int, int, int)
            Example index -> the pairs to bisect.
        """
        new_points = [(e, 0.5 * (self.alpha[a] + self.alpha[b])) for e, pairs in proposals.items()
                      for id0, mid, id1 in pairs for a, b in ((id0, mid), (mid, id1))]
        new_ids = iter(self.evaluate(new_points))
        for e, pairs in proposals.items():
            ex = self.examples[e]
            for pair in pairs:
                id0, mid, id1 = pair
                m0, m1 = next(new_ids), next(new_ids)
                # the four new intervals along the path, then the pair's own (kept for channel units)
                sums = self.layer_sums([(id0, m0), (m0, mid), (mid, m1), (m1, id1), (id0, id1), (id0, mid),
                                        (mid, id1)])
                new0, new1, new2, new3, parent, left, right = ({n: sums[n][i] for n in self.names}
                                                               for i in range(7))
                # the two halves become parents: values lose them, the coarse grid trades the old
                # parent for them
                for n in self.names:
                    self.add(self.coarse, e, n, parent[n], -1.0)
                    for half in (left[n], right[n]):
                        self.add(self.coarse, e, n, half, 1.0)
                        self.add(self.values, e, n, half, -1.0)
                    self.kept.pop((id0, id1, n), None)
                del ex.pairs[pair]
                del ex.residuals[(id0, mid)], ex.residuals[(mid, id1)]
                self.open_pair(e, (id0, m0, mid), left, new0, new1)
                self.open_pair(e, (mid, m1, id1), right, new2, new3)
                for pid in (m0, m1):
                    ex.ids.insert(bisect.bisect_left(ex.ids, self.alpha[pid], key=self.alpha.__getitem__), pid)
        self.read_back()

    def read_back(self) -> None:
        """Bring the round's numbers to the host in one transfer: the scores and residuals of the pairs
        opened since the last round (device tensors until now) and, per steering site and example, the
        norm of the values and of their distance to the coarse values (``site_norms``, (2, sites,
        batch)), which :meth:`norms` and :meth:`error` read. On CUDA one synchronisation per round,
        however many intervals it refined."""
        waiting = [(d, k) for ex in self.examples for d in (ex.pairs, ex.residuals) for k, v in d.items()
                   if isinstance(v, torch.Tensor)]
        parts = [d[k].reshape(-1) for d, k in waiting]
        if self.sites:
            B = self.problem.batch_size
            for m, n in self.sites:
                parts.append(self.values[m][n].reshape(B, -1).norm(dim=1))
            for m, n in self.sites:
                parts.append((self.coarse[m][n] - self.values[m][n]).reshape(B, -1).norm(dim=1))
        if not parts:
            return
        host = torch.cat([p.to(torch.float64) for p in parts]).cpu().numpy()
        at = 0
        for d, k in waiting:
            size = d[k].numel()
            d[k] = host[at:at + size]
            at += size
        if self.sites:
            self.site_norms = host[at:].reshape(2, len(self.sites), self.problem.batch_size)

    def finish(self, e: int) -> None:
        """Drop a finished example's stored points.

        Parameters
        ----------
        e : int
            Example index.
        """
        ex = self.examples[e]
        for pid in ex.ids:
            self.stored -= self.point_bytes(pid)
            for n in self.names:
                self.y[n][pid] = self.g[n][pid] = None
        mine = set(ex.ids)
        self.kept = {k: v for k, v in self.kept.items() if k[0] not in mine}

    def stalled(self, e: int, err: float) -> bool:
        """Whether a low-precision example has stopped improving (its error is rounding, not the grid).

        Parameters
        ----------
        e : int
            Example index.
        err : float
            Its error now.

        Returns
        -------
        bool
        """
        if not self.problem.low_precision:
            return False
        ex = self.examples[e]
        best, at = ex.best
        if err < best * STALL_RATIO:
            ex.best = (err, len(ex.ids))
            return False
        return len(ex.ids) >= 2 * max(at, 1)

    def run(self) -> Integral:
        """Start from the initial grid and refine every example until it meets the tolerance or the budget.

        Returns
        -------
        Integral
            Values and coarse values per measure and layer, each (batch, *unit_shape).
        """
        self.start()
        B = self.problem.batch_size
        active = list(range(B))
        while active:
            still = []
            for e in active:
                ex = self.examples[e]
                err = self.error(e)
                if (err <= self.tolerance or len(ex.ids) + 2 > self.max_points or self.memory_limited):
                    self.finish(e)
                elif self.stalled(e, err):
                    ex.precision_limited = True
                    self.finish(e)
                else:
                    still.append(e)
            active = still
            if not active:
                break
            proposals: dict[int, list[Pair]] = {}
            for e in active:
                chosen = self.choose(e)
                if chosen:
                    proposals[e] = chosen
                else:
                    self.finish(e)   # nothing left that can be bisected
            active = [e for e in active if e in proposals]
            if not proposals:
                break
            self.fit_memory(proposals)
            if any(proposals.values()):
                self.refine({e: p for e, p in proposals.items() if p})
        return self.integral()

    def fit_memory(self, proposals: dict[int, list[Pair]]) -> None:
        """Keep the worst proposals that fit the memory budget for stored points (two points a pair).

        Parameters
        ----------
        proposals : dict int -> list of (int, int, int)
            Example index -> pairs to bisect, worst first; trimmed in place.
        """
        first = next(iter(proposals))
        per_point = self.point_bytes(self.examples[first].ids[0])
        room = (self.store_bytes - self.stored) // max(per_point, 1) // 2
        wanted = sum(len(v) for v in proposals.values())
        if wanted <= room:
            return
        self.memory_limited = True
        ranked = sorted(((s, e, pair) for e in proposals for s, pair in self.scores(e)
                         if pair in proposals[e]), key=lambda t: -t[0])
        keep = {(e, pair) for _, e, pair in ranked[:max(0, int(room))]}
        for e in proposals:
            proposals[e] = [p for p in proposals[e] if (e, p) in keep]

    def integral(self) -> Integral:
        """The :class:`~conductance.engine.Integral` of the run so far.

        Returns
        -------
        Integral
            Values and coarse values per measure and layer, each (batch, *unit_shape).
        """
        dtype = _result_dtype(self.problem)
        values = {m: {n: v.to(dtype) for n, v in per.items()} for m, per in self.values.items()}
        coarse = {m: {n: v.to(dtype) for n, v in per.items()} for m, per in self.coarse.items()}
        F_start = torch.tensor([self.F[ex.ids[0]] for ex in self.examples], device=self.device, dtype=dtype)
        F_end = torch.tensor([self.F[ex.ids[-1]] for ex in self.examples], device=self.device, dtype=dtype)
        n_points = torch.tensor([len(ex.ids) for ex in self.examples], dtype=torch.long)
        residuals, alphas, masks = [], [], []
        for ex in self.examples:
            keys = list(zip(ex.ids[:-1], ex.ids[1:]))
            residuals.append(torch.tensor(np.stack([ex.residuals[k] for k in keys]), dtype=torch.float64))
            alphas.append(torch.tensor([self.alpha[i] for i in ex.ids], dtype=torch.float64))
            mids = {mid for _, mid, _ in ex.pairs}
            masks.append(torch.tensor([i not in mids for i in ex.ids]))
        return Integral(values, F_start, F_end, n_points, coarse=coarse, interval_residuals=residuals,
                        alphas=alphas, coarse_masks=masks, memory_limited=self.memory_limited,
                        precision_limited=[e for e, ex in enumerate(self.examples) if ex.precision_limited])


def _result_dtype(problem: PathProblem) -> torch.dtype:
    """Results come in the inputs' floating dtype, at least float32."""
    return torch.promote_types(problem.inputs.dtype, torch.float32)


def integrate_adaptive(problem: PathProblem, measures: dict[str, IntervalMeasure], units: str,
                       cut_layers: Sequence[str], unit_layers: Sequence[str], tolerance: float, max_points: int,
                       initial_steps: int, store_bytes: int, unit_floor: float,
                       refine_share: float = REFINE_SHARE) -> Integral:
    """Refine each example's path until, for every layer in ``unit_layers`` and every measure, the
    per-unit error estimate, and for every layer in ``cut_layers`` the completeness error, are at most
    ``tolerance`` (relative), or the budget of ``max_points`` per example is spent.

    See :class:`AdaptiveIntegrator` for the parameters; returns the
    :class:`~conductance.engine.Integral` with values and coarse values per measure and layer,
    each (batch, *unit_shape).

    Parameters
    ----------
    problem : PathProblem
    measures, units, cut_layers, unit_layers, tolerance, max_points, initial_steps, store_bytes, unit_floor,
    refine_share
        As for :class:`AdaptiveIntegrator`.

    Returns
    -------
    Integral
    """
    return AdaptiveIntegrator(problem, measures, units, cut_layers, unit_layers, tolerance, max_points,
                              initial_steps, store_bytes, unit_floor, refine_share).run()


__all__ = ["AdaptiveIntegrator", "integrate_adaptive", "REFINE_SHARE"]
