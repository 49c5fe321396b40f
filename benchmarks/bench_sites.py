#!/usr/bin/env python
"""conductance.sites: what the context-bound hooks cost, and threads on a real network.

(a) Cost of the guard each hook runs (is this block's key active in the running context?): a
    forward of ``nn.Sequential(nn.Identity())`` with a plain torch forward hook against the same
    forward with a ``sites.intervene`` hook that returns None (``whole=True``: the guard alone;
    default: the site's tensor is also selected and the call counted); and entering plus leaving
    an ``intervene`` block. Minimum over 7 rounds (20000 forwards, 2000 blocks), time.perf_counter.
(b) Threads on one real model: the pretrained EfficientNet-Lite0 (``conductance.assets``), real
    photos. Three threads at once, ``--repeats`` calls each: layer conductance of ``_blocks.15`` for
    chelsea, layer conductance of ``_blocks.10`` for coffee, and ``cd.ablate`` of 40 channels of
    ``_blocks.7`` around a forward of rocket. Every result is compared with ``torch.equal`` to the
    same call run serially before.

Usage::

    python benchmarks/bench_sites.py              # (a) and (b), about a minute on 2 cores
    python benchmarks/bench_sites.py --no-model   # (a) only
    PYTHONPATH=<older checkout>/src python benchmarks/bench_sites.py   # (b) before conductance.sites
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from torch import nn

import conductance as cd
from conductance import assets

try:
    from conductance import sites
except ImportError:   # a checkout from before conductance.sites: part (b) shows how threads fared then
    sites = None


def guard_cost() -> None:
    m, x = nn.Sequential(nn.Identity()), torch.zeros(1)

    def plain(n: int) -> float:
        h = m[0].register_forward_hook(lambda mod, a, o: None)
        try:
            t = time.perf_counter()
            for _ in range(n):
                m(x)
            return (time.perf_counter() - t) / n
        finally:
            h.remove()

    def guarded(n: int, whole: bool) -> float:
        with sites.intervene(m, {"0": lambda t: None}, whole=whole):
            t = time.perf_counter()
            for _ in range(n):
                m(x)
            return (time.perf_counter() - t) / n

    def block(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            with sites.intervene(m, {"0": lambda t: None}):
                pass
        return (time.perf_counter() - t) / n

    a, b, w, c = [], [], [], []
    for _ in range(7):
        a.append(plain(20000))
        w.append(guarded(20000, whole=True))
        b.append(guarded(20000, whole=False))
        c.append(block(2000))
    print(f"(a) forward with a plain torch hook {min(a) * 1e6:.2f} us; with a sites hook {min(w) * 1e6:.2f} us "
          f"(whole=True: the guard only, {(min(w) - min(a)) * 1e6:.2f} us more), {min(b) * 1e6:.2f} us (the site's "
          f"tensor selected and counted, {(min(b) - min(a)) * 1e6:.2f} us more); entering and leaving intervene "
          f"{min(c) * 1e6:.1f} us")


def threads(repeats: int) -> None:
    model = assets.efficientnet_lite0()
    photos = assets.photo_batch(["chelsea", "coffee", "rocket"])
    chelsea, coffee, rocket = photos[0:1], photos[1:2], photos[2:3]

    def lc15() -> torch.Tensor:
        return cd.layer_conductance(model, chelsea, "_blocks.15", n_steps=8, units="channel")["_blocks.15"]

    def lc10() -> torch.Tensor:
        return cd.layer_conductance(model, coffee, "_blocks.10", n_steps=8, units="channel")["_blocks.10"]

    def ablated() -> torch.Tensor:
        with torch.no_grad(), cd.ablate(model, "_blocks.7", list(range(40)), units="channel"):
            return model(rocket)

    tasks = {"layer _blocks.15": lc15, "layer _blocks.10": lc10, "ablate _blocks.7": ablated}
    start = time.perf_counter()
    serial = {name: fn() for name, fn in tasks.items()}
    serial_s = time.perf_counter() - start
    with torch.no_grad():
        plain = model(rocket)
    assert not torch.equal(plain, serial["ablate _blocks.7"]), "the ablation must change the logits"
    results: dict[str, list] = {name: [] for name in tasks}
    barrier = threading.Barrier(len(tasks))

    def work(name: str) -> None:
        barrier.wait()
        for _ in range(repeats):
            try:
                results[name].append(tasks[name]())
            except Exception as exc:  # counted below
                results[name].append(exc)

    start = time.perf_counter()
    pool = [threading.Thread(target=work, args=(name,)) for name in tasks]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    threaded_s = time.perf_counter() - start
    print(f"(b) EfficientNet-Lite0, {len(tasks)} threads x {repeats} calls (serial pass {serial_s:.1f} s, "
          f"threaded {threaded_s:.1f} s):")
    for name, got in results.items():
        equal = sum(isinstance(r, torch.Tensor) and torch.equal(r, serial[name]) for r in got)
        errors = [r for r in got if isinstance(r, Exception)]
        print(f"    {name}: {equal} of {len(got)} equal to the serial result"
              + (f"; {len(errors)} raised, first: {errors[0]!r}" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-model", action="store_true", help="part (a) only")
    parser.add_argument("--repeats", type=int, default=3, help="calls per thread in part (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if sites is not None:
        guard_cost()
    if not args.no_model:
        threads(args.repeats)


if __name__ == "__main__":
    main()
