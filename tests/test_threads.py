"""Several threads computing on ONE model give the results of serial calls.

The library's hooks fire only for the call that installed them (conductance.sites): a layer
conductance in one thread does not record another thread's forward, and an ablation in one
thread does not change another thread's forward.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

import conductance as cd
from models import random_mlp

REPEATS = 30


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(3, 5, generator=torch.Generator().manual_seed(seed))


def _tasks(model):
    x0, x1, x2, x3 = (_inputs(s) for s in (1, 2, 3, 4))

    def layer_a():
        r = cd.layer_conductance(model, x0, "1", n_steps=16, method="uniform")
        return torch.cat([r["1"].flatten(), r.output_diff.flatten()])

    def layer_b():
        r = cd.layer_conductance(model, x1, ["2", "3"], n_steps=16, method="gausslegendre")
        return torch.cat([r["2"].flatten(), r["3"].flatten()])

    def neuron():
        return cd.neuron_conductance(model, x2, "1", [0, 3, 6])   # the default adaptive rule

    def ablation():
        with cd.ablate(model, "1", [1, 2, 4]):
            ablated = model(x3)
        with cd.ablate(model, "3", [0], mode="baseline", values=torch.full((7,), 0.5)):
            ablated2 = model(x3)
        return torch.cat([ablated.flatten(), ablated2.flatten(), model(x3).flatten()])

    def flips():
        # expanded rows: pre-hooks on every submodule of the model, the most intrusive installation
        ranking = torch.tensor([6, 0, 5, 1, 4, 2, 3])
        return cd.flip_count(model, torch.cat([x0, x1]), "3", ranking, expand_at_layer=True)

    return {"layer_a": layer_a, "layer_b": layer_b, "neuron": neuron, "ablation": ablation, "flips": flips}


def _threaded(model, tasks, repeats=REPEATS):
    """Each task in its own thread, ``repeats`` times; returns name -> list of results (or exceptions)."""
    start = threading.Barrier(len(tasks))
    out = {name: [] for name in tasks}

    def work(name, fn):
        torch.set_num_threads(1)
        start.wait()
        for _ in range(repeats):
            try:
                out[name].append(fn())
            except Exception as exc:  # collected: the assertion below reports every failure
                out[name].append(exc)

    threads = [threading.Thread(target=work, args=item) for item in tasks.items()]
    # the warning filters are process-wide: set once here, not from the threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return out


def test_threads_on_one_model_equal_serial_results():
    model = random_mlp(seed=11)
    tasks = _tasks(model)
    with torch.no_grad():
        plain = model(_inputs(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the accuracy warnings of the fixed rules
        serial = {name: fn() for name, fn in tasks.items()}
    # the ablations change the output, and some example flips (else the checks below could not fail)
    assert not torch.equal(serial["ablation"][:12], plain.flatten())
    assert torch.isfinite(serial["flips"]).any()
    out = _threaded(model, tasks)
    failures = {}
    for name, results in out.items():
        bad = [r if isinstance(r, Exception) else "differs" for r in results
               if isinstance(r, Exception) or not torch.equal(r, serial[name])]
        if bad:
            failures[name] = (len(bad), repr(bad[0]))
    assert not failures, f"calls (of {REPEATS}) that failed or differed from the serial result: {failures}"
    for _, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_threads_on_one_transformer_equal_serial_results():
    """cd.hf's hooks (embedding replacement, ':input' probes, head and neuron masks) stay in their thread."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_inner=24, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, bos_token_id=1, eos_token_id=2)).double().eval()
    g = torch.Generator().manual_seed(1)
    ids_a, ids_b = torch.randint(3, 40, (2, 6), generator=g), torch.randint(3, 40, (1, 6), generator=g)

    def heads_and_mlp():
        names = cd.hf.layers(gpt2, ["attention", "mlp"])
        r = cd.hf.layer_conductance(gpt2, ids_a, names, target=[(5, 3), (2, 7)], n_steps=8)
        return torch.cat([r[n].flatten() for n in names])

    def blocks():
        names = cd.hf.layers(gpt2, "block")
        r = cd.hf.layer_conductance(gpt2, ids_b, names, target=[(4, 9)], n_steps=8)
        return torch.cat([r[n].flatten() for n in names])

    def ablated():
        with torch.no_grad(), cd.hf.ablate_heads(gpt2, [(0, 1), (1, 3)]), cd.hf.ablate_neurons(gpt2, {1: [0, 5]}):
            heads_off = gpt2(ids_b).logits
        inputs = cd.hf.head_inputs(gpt2, ids_b)
        return torch.cat([heads_off.flatten(), inputs[0].flatten(), inputs[1].flatten()])

    tasks = {"heads_and_mlp": heads_and_mlp, "blocks": blocks, "ablated": ablated}
    with torch.no_grad():
        plain = gpt2(ids_b).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the accuracy warnings of n_steps=8
        serial = {name: fn() for name, fn in tasks.items()}
    assert not torch.equal(serial["ablated"][:plain.numel()], plain.flatten())
    out = _threaded(gpt2, tasks, repeats=4)
    failures = {name: sum(isinstance(r, Exception) or not torch.equal(r, serial[name]) for r in results)
                for name, results in out.items()}
    assert not any(failures.values()), f"calls (of 4) that failed or differed from the serial result: {failures}"
    for _, m in gpt2.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
