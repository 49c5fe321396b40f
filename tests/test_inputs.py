"""conductance.inputs as a module: the checks of inputs, baselines, forward arguments and targets."""

import pytest
import torch

from conductance.errors import ConductanceError
from conductance.inputs import check_baselines, check_forward_args, check_inputs, pack_inputs, resolve_target

CPU = torch.device("cpu")


def test_check_inputs_accepts_a_float_batch_and_detaches_it():
    x = torch.randn(3, 4, requires_grad=True)
    out = check_inputs(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, x.detach())


def test_check_inputs_refusals_name_the_problem():
    with pytest.raises(TypeError, match="must be a torch.Tensor of shape .batch.*got list"):
        check_inputs([1.0, 2.0])
    with pytest.raises(TypeError, match="dtype torch.int64.*embedding layer"):
        check_inputs(torch.tensor([[1, 2]]))
    with pytest.raises(ConductanceError, match=r"at least one example; got shape \(0, 3\)"):
        check_inputs(torch.zeros(0, 3))
    with pytest.raises(ConductanceError, match="batch dimension"):
        check_inputs(torch.tensor(1.0))
    bad = torch.zeros(4, 2)
    bad[1, 0] = float("nan")
    bad[3, 1] = float("inf")
    with pytest.raises(ConductanceError, match=r"NaN or Inf \(examples \[1, 3\]\)"):
        check_inputs(bad)


def test_check_baselines_forms():
    x = torch.randn(3, 2)
    torch.testing.assert_close(check_baselines(None, x), torch.zeros(3, 2))
    torch.testing.assert_close(check_baselines(0.5, x), torch.full((3, 2), 0.5))
    shared = check_baselines(torch.tensor([1.0, -1.0]), x)            # one baseline for every example
    torch.testing.assert_close(shared, torch.tensor([[1.0, -1.0]] * 3))
    assert shared.is_contiguous()
    per_example = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(check_baselines(per_example, x), per_example)
    assert check_baselines(torch.ones(2, dtype=torch.float64), x).dtype == torch.float32   # the inputs' dtype


def test_check_baselines_refusals():
    x = torch.randn(3, 2)
    with pytest.raises(ConductanceError, match=r"shape \(4,\) do not broadcast to the inputs' shape \(3, 2\).*\(2,\)"):
        check_baselines(torch.zeros(4), x)
    with pytest.raises(ConductanceError, match="NaN or Inf"):
        check_baselines(float("nan"), x)
    with pytest.raises(TypeError, match="got str"):
        check_baselines("zeros", x)


def test_check_forward_args_forms_and_refusals():
    assert check_forward_args(None, None) == ((), {})
    mask = torch.ones(2)
    args, kwargs = check_forward_args(mask, {"scale": 2})
    assert args == (mask,) and kwargs == {"scale": 2}
    assert check_forward_args((1, 2), None)[0] == (1, 2)
    with pytest.raises(ConductanceError, match=r"got a list: .*additional_forward_args=\(your_list,\)"):
        check_forward_args([1, 2], None)
    with pytest.raises(ConductanceError, match="got a dict: pass keyword arguments as forward_kwargs="):
        check_forward_args({"a": 1}, None)
    with pytest.raises(ConductanceError, match="forward_kwargs must be a dict.*got tuple"):
        check_forward_args(None, (1,))
    with pytest.raises(ConductanceError, match="with non-string keys"):
        check_forward_args(None, {1: 2})


def test_resolve_target_on_class_scores():
    out = torch.tensor([[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]])
    torch.testing.assert_close(resolve_target(None, out, 2, CPU), torch.tensor([1, 0]))   # the predicted class
    torch.testing.assert_close(resolve_target(2, out, 2, CPU), torch.tensor([2, 2]))
    torch.testing.assert_close(resolve_target([0, 2], out, 2, CPU), torch.tensor([0, 2]))
    torch.testing.assert_close(resolve_target(torch.tensor(1), out, 2, CPU), torch.tensor([1, 1]))
    assert resolve_target(None, torch.zeros(2), 2, CPU) is None
    assert resolve_target(None, torch.zeros(2, 1), 2, CPU) is None

    def pick(output):
        return output[:, 0]
    assert resolve_target(pick, out, 2, CPU) is pick


def test_resolve_target_refusals_on_class_scores():
    out = torch.zeros(2, 3)
    with pytest.raises(ConductanceError, match=r"out of range: the model has 3 outputs \(valid classes 0..2\)"):
        resolve_target(3, out, 2, CPU)
    with pytest.raises(ConductanceError, match=r"shape \(3,\); it must be one class per example, shape \(2,\)"):
        resolve_target([0, 1, 2], out, 2, CPU)
    with pytest.raises(TypeError, match="integer dtype"):
        resolve_target(torch.tensor([0.0, 1.0]), out, 2, CPU)
    with pytest.raises(TypeError, match="got str"):
        resolve_target("cat", out, 2, CPU)
    with pytest.raises(ConductanceError, match="nothing to pick, pass target=None"):
        resolve_target(0, torch.zeros(2), 2, CPU)


def test_resolve_target_index_tuples_for_a_sequence_output():
    out = torch.zeros(2, 4, 10)                 # (batch, positions, vocab)
    torch.testing.assert_close(resolve_target([(3, 7), (-1, -2)], out, 2, CPU), torch.tensor([[3, 7], [3, 8]]))
    torch.testing.assert_close(resolve_target((1, 2), out, 2, CPU), torch.tensor([[1, 2], [1, 2]]))
    with pytest.raises(ConductanceError, match="an int target picks a class"):
        resolve_target(3, out, 2, CPU)
    with pytest.raises(ConductanceError, match=r"target \(4, 0\) of example 1 is out of range"):
        resolve_target([(0, 0), (4, 0)], out, 2, CPU)
    with pytest.raises(ConductanceError, match=r"target entries have \[3\] indices"):
        resolve_target([(0, 0, 0), (1, 1, 1)], out, 2, CPU)
    with pytest.raises(ConductanceError, match=r"target=None needs \(batch, classes\)"):
        resolve_target(None, out, 2, CPU)


def test_pack_inputs_packs_and_unpacks_every_input():
    a = torch.randn(2, 3)
    b = torch.randn(2, 2, 2, dtype=torch.float64)
    flat, base, spec = pack_inputs((a, b), (1.0, None))
    assert flat.shape == (2, 3 + 4) and flat.dtype == torch.float64
    torch.testing.assert_close(flat[:, :3], a.double())
    torch.testing.assert_close(flat[:, 3:], b.reshape(2, 4))
    torch.testing.assert_close(base, torch.cat([torch.ones(2, 3), torch.zeros(2, 4)], 1).double())
    back_a, back_b = spec.unpack(flat)
    assert back_a.dtype == torch.float32 and back_b.shape == (2, 2, 2)
    torch.testing.assert_close(back_a, a)
    torch.testing.assert_close(back_b, b)
    # leading dimensions pass through: (points, batch, N) -> (points, batch, *shape)
    assert spec.unpack(flat.expand(5, 2, 7))[1].shape == (5, 2, 2, 2)


def test_pack_inputs_refusals_name_the_input():
    a = torch.randn(2, 3)
    with pytest.raises(ConductanceError, match="empty tuple"):
        pack_inputs((), None)
    with pytest.raises(ConductanceError, match=r"share the batch size.*\[2, 3\]"):
        pack_inputs((a, torch.randn(3, 3)), None)
    with pytest.raises(ConductanceError, match="1 baselines for 2 inputs"):
        pack_inputs((a, a), (None,))
    with pytest.raises(ConductanceError, match="baselines must be a tuple too"):
        pack_inputs((a, a), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"^inputs\[1\]: .*dtype torch.int64"):
        pack_inputs((a, torch.ones(2, 3, dtype=torch.long)), None)
    with pytest.raises(ConductanceError, match=r"^baselines\[0\]: .*do not broadcast"):
        pack_inputs((a, a), (torch.zeros(5), None))
