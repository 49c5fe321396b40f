"""Why does L1 magnitude beat conductance on the Inception-style network without the mean fill?

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pruning_why.py OUT.json [inception,resnet]
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pruning_why.py shift OUT.json [inception,resnet]

Uses the better-trained networks of benchmarks/pruning_trained.py (loaded from the cache, or
trained) and the study's settings (the first 256 Fashion-MNIST training images as calibration set,
the first 2,000 test images). For every channel of every group Torch-Pruning's ``MetaPruner``
scores, it measures the oracle the criteria stand in for: the rise of the mean cross-entropy on the
calibration images when that channel alone is removed (every reader sees zero: the BatchNorm
outputs of the group are zeroed, which the ReLUs pass as zero) and when it is held at its
calibration mean instead (the mean fill). Then, per criterion:

- the Spearman correlation of its scores with both oracles, per group, averaged over groups;
- the removed channels at 10% per layer: their oracle losses and their post-ReLU calibration means
  (as a percentile within their layer);
- test accuracy at 10/20/30% per layer, without and with the mean fill, for conductance with each
  statistic, with the 16-interval rule and with the adaptive rule (``tolerance=0.02``), L1,
  Taylor, gradient x activation, activation and the two oracles themselves;
- how many coupled convolutions each group has (the coupled-group explanation needs more than one).

``shift``: per criterion at 10/20/30%, the first-order shift that deleting its channels causes in the
layers that read them (in standard deviations of the readers' BatchNorm outputs; found by the
Inception's ``.conv`` -> ``.bn`` names, so None on the ResNet), the share of test images in the
pruned network's most predicted class, and the accuracy with ``compensate="baseline"``.
Numbers in docs/pruning.md ("Where conductance wins and where it does not").
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from conductance.experiments import fashion_inception as fi
from conductance.experiments import pruning as study
from conductance.experiments.report import to_jsonable
from conductance.pruning import ConductanceImportance

RATIOS = (0.1, 0.2, 0.3)


class FixedImportance(tp.importance.Importance):
    """Precomputed scores of each group's root layer (by name): prunes by any per-channel ranking."""

    def __init__(self, scores: dict):
        self.scores = scores

    def __call__(self, group):
        name = group._DG._module2name[group[0].dep.target.module]
        s = self.scores.get(name)
        return None if s is None else torch.as_tensor(s, dtype=torch.float32)[list(group[0].idxs)]


def groups_of(model: nn.Module, example: torch.Tensor) -> list:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    fc = study.classifier(model)
    out = []
    for g in dg.get_all_groups(ignored_layers=[fc], root_module_types=(nn.Conv2d, nn.Linear)):
        root = g[0].dep.target.module
        if not isinstance(root, nn.Conv2d):
            continue
        bns, convs = [], []
        for dep, idxs in g:
            m = dep.target.module
            if dep.handler == tp.pruner.function.prune_batchnorm_out_channels:
                bns.append((dg._module2name[m], list(idxs)))
            if dep.handler == tp.pruner.function.prune_conv_out_channels:
                convs.append(dg._module2name[m])
        out.append({"root": dg._module2name[root], "n": len(g[0].idxs), "root_idxs": list(g[0].idxs),
                    "bns": bns, "convs": sorted(set(convs))})
    return out


def post_relu_means(model: nn.Module, groups: list, x: torch.Tensor) -> dict:
    """Calibration mean of relu(BatchNorm output) of each group's root channels, by root name."""
    modules = dict(model.named_modules())
    store: dict = {}
    hooks = []
    for g in groups:
        bn_name, idxs = g["bns"][0]

        def hook(_m, _i, out, key=g["root"], idxs=idxs):
            store[key] = out.detach().relu().mean((0, 2, 3))[idxs].double()
        hooks.append(modules[bn_name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.numpy() for k, v in store.items()}


def oracle(model: nn.Module, groups: list, x: torch.Tensor, y: torch.Tensor, means: dict) -> tuple:
    """Loss rise when each channel alone is zeroed / held at its post-ReLU mean (groups' BN outputs)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        base = float(nn.functional.cross_entropy(model(x), y))
    zero, mean = {}, {}
    for g in groups:
        dz, dm = np.zeros(g["n"]), np.zeros(g["n"])
        single = len(g["bns"]) == 1
        for j in range(g["n"]):
            for kind, arr in (("zero", dz), ("mean", dm)):
                if kind == "mean" and not single:      # a residual stream: the mean of a sum; not measured
                    arr[j] = np.nan
                    continue
                hooks = []
                for bn_name, idxs in g["bns"]:
                    c = idxs[j]
                    value = 0.0 if kind == "zero" else float(means[g["root"]][j])

                    def hook(_m, _i, out, c=c, value=value):
                        out = out.clone()
                        out[:, c] = value
                        return out
                    hooks.append(modules[bn_name].register_forward_hook(hook))
                try:
                    with torch.no_grad():
                        arr[j] = float(nn.functional.cross_entropy(model(x), y)) - base
                finally:
                    for h in hooks:
                        h.remove()
        zero[g["root"]], mean[g["root"]] = dz, dm
    return zero, mean


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra = np.argsort(np.argsort(a[ok])).astype(float)
    rb = np.argsort(np.argsort(b[ok])).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def group_scores(imp, model: nn.Module, example: torch.Tensor, groups: list) -> dict:
    """Scores the importance gives each group's root channels (the pruner's view), by root name."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    fc = study.classifier(model)
    out = {}
    for g in dg.get_all_groups(ignored_layers=[fc], root_module_types=(nn.Conv2d, nn.Linear)):
        name = dg._module2name[g[0].dep.target.module]
        if any(name == gg["root"] for gg in groups):
            s = imp(g)
            out[name] = None if s is None else s.detach().double().numpy()
    return out


def with_statistic(imp: ConductanceImportance, statistic: str) -> ConductanceImportance:
    """A copy of a fitted conductance importance scoring with another statistic (same aggregate result)."""
    other = copy.copy(imp)
    other.statistic = statistic
    other._scores = {m: torch.from_numpy(other._statistic(imp.result, name).astype(np.float32))
                     for m, name in imp._names.items()}
    other._names = dict(imp._names)
    return other


def study_net(name: str, model: nn.Module, log) -> dict:
    x_cal, y_cal = fi.fashion_tensors("train", 256)
    calibration = [(x_cal[s:s + 64], y_cal[s:s + 64]) for s in range(0, 256, 64)]
    x_te, y_te = fi.fashion_tensors("test", 2000)
    example = x_cal[:1]
    out: dict = {"base_accuracy": fi.evaluate(model, x_te, y_te)}
    groups = groups_of(model, example)
    out["groups"] = [{"root": g["root"], "n": g["n"], "coupled_convs": g["convs"]} for g in groups]
    log(f"{name}: {len(groups)} groups, {sum(g['n'] for g in groups)} channels; "
        f"{sum(len(g['convs']) > 1 for g in groups)} with coupled convolutions")
    means = post_relu_means(model, groups, x_cal)
    start = time.perf_counter()
    dz, dm = oracle(model, groups, x_cal, y_cal, means)
    out["oracle_seconds"] = time.perf_counter() - start
    log(f"{name}: oracle {out['oracle_seconds']:.0f} s")

    # the criteria, as FixedImportance (scores by root name) or the study's own importance objects
    imps: dict = {}
    secs: dict = {}
    for crit in ("l1", "taylor", "grad_x_activation", "activation"):
        imp = study.make_importance(crit, calibration)
        if hasattr(imp, "fit"):
            imp.fit(model)
        imps[crit] = imp
    for label, options in (("", {"n_steps": 16}), ("_adaptive", {"tolerance": 0.02})):
        imp = ConductanceImportance(calibration, **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp.fit(model)
        secs["conductance" + label] = imp.seconds
        out.setdefault("warnings", {})["conductance" + label] = sorted({str(w.message)[:160] for w in caught})
        out.setdefault("completeness", {})["conductance" + label] = study._completeness(imp)
        for stat in ("class_max", "class_abs", "rms", "mean"):
            imps[f"conductance{label}_{stat}"] = with_statistic(imp, stat)
    out["conductance_seconds"] = secs
    imps["oracle_zero"] = FixedImportance(dz)
    # residual streams have no single-channel mean oracle: they keep the zero oracle there
    imps["oracle_mean"] = FixedImportance({k: np.where(np.isfinite(v), v, dz[k]) for k, v in dm.items()})

    scores = {crit: group_scores(imp, model, example, groups) for crit, imp in imps.items()}
    # 16 intervals against adaptive: does the ranking move?
    out["rank_16_vs_adaptive"] = {
        stat: float(np.mean([spearman(scores[f"conductance_{stat}"][g["root"]],
                                      scores[f"conductance_adaptive_{stat}"][g["root"]]) for g in groups]))
        for stat in ("class_max", "class_abs")}

    # removed at 10%: as many per group as the pruner removes
    m10 = study.prune_copy(model, imps["l1"], 0.1, example)
    mods10 = dict(m10.named_modules())
    k10 = {g["root"]: g["n"] - int(mods10[g["root"]].out_channels) for g in groups}
    rows = {}
    for crit, sc in scores.items():
        rz, rm, rmz, rp, sz, smn = [], [], [], [], [], []
        for g in groups:
            s = sc.get(g["root"])
            if s is None:
                continue
            w = g["n"]
            sz.append(spearman(s, dz[g["root"]]))
            smn.append(spearman(s, dm[g["root"]]))
            order = np.argsort(s, kind="stable")[:k10[g["root"]]]
            mu = means[g["root"]]
            pct = np.argsort(np.argsort(mu)) / max(w - 1, 1)
            rz.extend(dz[g["root"]][order])
            rm.extend(dm[g["root"]][order])
            rp.extend(pct[order])
            rmz.append(float(np.mean(mu[order]) / max(np.mean(mu), 1e-12)))
        rows[crit] = {"spearman_zero": float(np.nanmean(sz)), "spearman_mean": float(np.nanmean(smn)),
                      "removed10_loss_zero_sum": float(np.nansum(rz)), "removed10_loss_mean_sum": float(np.nansum(rm)),
                      "removed10_mean_percentile": float(np.mean(rp)),
                      "removed10_mean_over_layer_mean": float(np.mean(rmz))}
    # accuracies
    for crit, imp in imps.items():
        acc, acc_fill = [], []
        for ratio in RATIOS:
            acc.append(fi.evaluate(study.prune_copy(model, imp, ratio, example), x_te, y_te))
            acc_fill.append(fi.evaluate(study.prune_copy(model, imp, ratio, example, compensate="mean",
                                                         fill_data=calibration), x_te, y_te))
        rows[crit]["pruned"], rows[crit]["pruned_mean_fill"] = acc, acc_fill
        log(f"{name}: {crit:34s} rho(zero) {rows[crit]['spearman_zero']:+.3f} rho(mean) "
            f"{rows[crit]['spearman_mean']:+.3f} removed10: loss(zero) {rows[crit]['removed10_loss_zero_sum']:.3f} "
            f"mean pct {rows[crit]['removed10_mean_percentile']:.2f} | pruned {np.round(acc, 3).tolist()} "
            f"fill {np.round(acc_fill, 3).tolist()}")
    out["criteria"] = rows
    out["k10"] = k10
    return out


def main(path: str, parts: str = "inception,resnet") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out: dict = {}
    nets = {"inception": lambda: fi.load_or_train(fi.FULL_CONFIG, log=print).model,
            "resnet": lambda: study.load_or_train_resnet(study.ResNetConfig(n_train=20000, epochs=2, batch_size=128),
                                                         log=print).model}
    for name in parts.split(","):
        start = time.perf_counter()
        out[name] = study_net(name, nets[name]().eval(), print)
        out[name]["seconds"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(to_jsonable(out), f, indent=1)




# ----------------------------------------------------------------------------------------------
# Second part: the shift the removed channels' means cause in the layers that read them
# ----------------------------------------------------------------------------------------------

def removed_sets(scores: dict, k: dict) -> dict:
    """Root name -> the k[root] lowest-scored channels (what per-layer pruning removes)."""
    return {root: np.argsort(np.asarray(s), kind="stable")[:k[root]] for root, s in scores.items() if s is not None}


def reader_shift(model: nn.Module, example: torch.Tensor, removed: dict, fill: dict) -> dict:
    """Linear estimate of what deleting ``removed`` shifts in every reading layer, before any later change.

    For a reader with weights W and its input channels' calibration means m, deleting channels R
    moves its output j by s_j = sum_{c in R} sum_kernel W[j, c] m_c. Reported in units of the
    reader's BatchNorm (gamma_j s_j / sqrt(var_j + eps): the shift of the next pre-activation in
    its own standard deviations) and, for the classifier, the spread over classes of the logit
    shift (a shift equal for every class changes no prediction).
    """
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    fc = study.classifier(model)
    names = dg._module2name
    modules = dict(model.named_modules())
    shift: dict = {}
    for g in dg.get_all_groups(ignored_layers=[fc], root_module_types=(nn.Conv2d, nn.Linear)):
        root = names[g[0].dep.target.module]
        if root not in removed or len(removed[root]) == 0:
            continue
        drop = {int(i) for i in removed[root]}
        for i, (dep, idxs) in enumerate(g):
            m = dep.target.module
            if dep.handler not in (tp.pruner.function.prune_conv_in_channels,
                                   tp.pruner.function.prune_linear_in_channels) or m not in fill:
                continue
            rows = [idx for idx, r in zip(idxs, g[i].root_idxs) if r is not None and int(r) in drop]
            if not rows:
                continue
            w = m.weight.detach().double()
            w = w[:, rows] if w.dim() == 2 else w[:, rows].flatten(2).sum(2)
            s = w @ fill[m].double()[rows]
            shift[names[m]] = shift.get(names[m], 0) + s
    out = {"bn_units": [], "fc_spread": 0.0}
    for name, s in shift.items():
        m = modules[name]
        if m is fc:
            out["fc_spread"] = float(s.std())
            continue
        bn = modules.get(name[:-len("conv")] + "bn") if name.endswith("conv") else None
        if bn is None:
            continue
        z = bn.weight.detach().double() * s / torch.sqrt(bn.running_var.double() + bn.eps)
        out["bn_units"].extend(z.abs().tolist())
    v = np.array(out.pop("bn_units"))
    # None where no reader's BatchNorm was found (it is looked up by the Inception's `.conv` -> `.bn` names)
    out["bn_mean_abs"] = float(v.mean()) if v.size else None
    out["bn_share_above_1"] = float((v > 1).mean()) if v.size else None
    return out


def collapse(model: nn.Module, x: torch.Tensor) -> float:
    """Share of ``x`` predicted as the most predicted class."""
    with torch.no_grad():
        pred = torch.cat([model(x[s:s + 500]).argmax(1) for s in range(0, x.shape[0], 500)])
    return float(torch.bincount(pred, minlength=10).max()) / pred.numel()


def shift_net(name: str, model: nn.Module, log, oracle_scores: bool = True) -> dict:
    from conductance.pruning import input_fill

    x_cal, y_cal = fi.fashion_tensors("train", 256)
    calibration = [(x_cal[s:s + 64], y_cal[s:s + 64]) for s in range(0, 256, 64)]
    x_te, y_te = fi.fashion_tensors("test", 2000)
    example = x_cal[:1]
    fill = input_fill(model, [b[0] for b in calibration])
    groups = groups_of(model, example)
    imps: dict = {crit: study.make_importance(crit, calibration) for crit in ("l1", "taylor")}
    imps["taylor"].fit(model)
    cond = ConductanceImportance(calibration, n_steps=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cond.fit(model)
    for stat in ("class_max", "class_abs", "rms"):
        imps[f"conductance_{stat}"] = with_statistic(cond, stat)
    scores = {crit: group_scores(imp, model, example, groups) for crit, imp in imps.items()}
    rng = np.random.default_rng(0)
    for r in range(3):
        scores[f"random{r}"] = {g["root"]: rng.permutation(g["n"]).astype(float) for g in groups}
        imps[f"random{r}"] = FixedImportance(scores[f"random{r}"])
    out: dict = {"base_accuracy": fi.evaluate(model, x_te, y_te), "criteria": {}}
    for ratio in RATIOS:
        ref = study.prune_copy(model, imps["l1"], ratio, example)
        mods = dict(ref.named_modules())
        k = {g["root"]: g["n"] - int(mods[g["root"]].out_channels) for g in groups}
        for crit, sc in scores.items():
            row = out["criteria"].setdefault(crit, {})
            sh = reader_shift(model, example, removed_sets(sc, k), fill)
            pruned = study.prune_copy(model, imps[crit], ratio, example)
            row.setdefault("shift_bn_mean_abs", []).append(sh["bn_mean_abs"])
            row.setdefault("shift_bn_share_above_1", []).append(sh["bn_share_above_1"])
            row.setdefault("shift_fc_spread", []).append(sh["fc_spread"])
            row.setdefault("pruned", []).append(fi.evaluate(pruned, x_te, y_te))
            row.setdefault("top_class_share", []).append(collapse(pruned, x_te))
            if crit in ("l1", "conductance_class_max", "conductance_rms"):
                base = study.prune_copy(model, imps[crit], ratio, example, compensate="baseline")
                row.setdefault("pruned_baseline_fill", []).append(fi.evaluate(base, x_te, y_te))
            log(f"{name} {ratio:.1f} {crit:24s} shift/std {sh['bn_mean_abs']} (>1: {sh['bn_share_above_1']}) "
                f"fc spread {sh['fc_spread']:.3f} acc {row['pruned'][-1]:.3f} "
                f"top class {row['top_class_share'][-1]:.2f}"
                + (f" baseline fill {row['pruned_baseline_fill'][-1]:.3f}" if "pruned_baseline_fill" in row else ""))
    return out


def main_shift(path: str, parts: str = "inception,resnet") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = {"inception": lambda: fi.load_or_train(fi.FULL_CONFIG, log=print).model,
            "resnet": lambda: study.load_or_train_resnet(study.ResNetConfig(n_train=20000, epochs=2, batch_size=128),
                                                         log=print).model}
    out: dict = {}
    for name in parts.split(","):
        start = time.perf_counter()
        out[name] = shift_net(name, nets[name]().eval(), print)
        out[name]["seconds"] = time.perf_counter() - start
        with open(path, "w") as f:
            json.dump(to_jsonable(out), f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["shift"]:
        main_shift(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
