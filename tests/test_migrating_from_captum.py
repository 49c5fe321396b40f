"""docs/migrating-from-captum.md runs as written, and each of our calls equals its Captum call.

The page's ``python`` blocks are: the shared setup, then for each Captum class a Captum block
(assigning ``theirs``) followed by our block (assigning ``ours``)."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

pytest.importorskip("captum.attr")

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating-from-captum.md"


def sections() -> tuple[str, list[tuple[str, str, str]]]:
    text = PAGE.read_text()
    blocks = []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        heading = re.findall(r"^## (.+)$", text[:m.start()], re.M)[-1]
        blocks.append((heading, m.group(1)))
    setup = blocks[0][1]
    pairs = blocks[1:]
    assert len(pairs) % 2 == 0, "every Captum block needs its own block after it"
    out = []
    for (h1, theirs), (h2, ours) in zip(pairs[::2], pairs[1::2]):
        assert h1 == h2, f"blocks of {h1!r} and {h2!r} are not a pair"
        out.append((h1, theirs, ours))
    return setup, out


SETUP, PAIRS = sections()


def test_the_page_covers_every_class():
    names = {h.split()[0] for h, _, _ in PAIRS}
    assert {"LayerConductance", "NeuronConductance", "LayerIntegratedGradients", "InternalInfluence",
            "LayerActivation", "LayerGradientXActivation"} <= names


@pytest.mark.filterwarnings("ignore::conductance.ConductanceWarning")
@pytest.mark.parametrize("heading, theirs_code, ours_code", PAIRS, ids=[h for h, _, _ in PAIRS])
def test_pair_gives_the_same_numbers(heading, theirs_code, ours_code):
    env: dict = {}
    exec(compile(SETUP, str(PAGE), "exec"), env)
    exec(compile(theirs_code, str(PAGE), "exec"), env)
    assert "ca." in theirs_code and "cd." not in theirs_code
    assert "cd." in ours_code and "ca." not in ours_code
    exec(compile(ours_code, str(PAGE), "exec"), env)
    theirs, ours = env["theirs"].detach(), env["ours"]
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 1e-2, f"{heading}: Captum's answer is (nearly) zero; the check would mean nothing"
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale, heading
    if "delta" in env:
        torch.testing.assert_close(env["result"].delta["2"], env["delta"].detach(), rtol=0,
                                   atol=1e-5 * env["result"].output_diff.abs().max().item())
