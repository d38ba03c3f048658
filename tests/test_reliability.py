"""Reliability of macfn.step: non-finite values, low precision, degenerate input, bad input, checkpoints."""

from __future__ import annotations

import copy
import io
import pathlib
import re
import warnings

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import Tensor, nn
from torch.func import functional_call

import macfn
import macfn.optim
from tests import _reference as ref
from tests._dense_mac import DenseMAC

# float64 against the dense reference; the only differences are summation order.
FLOAT64_TOLERANCE = 1e-10
# Inductor fuses and reorders float32 reductions; after a few steps the drift observed is about 1e-6.
COMPILED_TOLERANCE = 1e-4
# A mean of 4096 float16 rows accumulated in float32: observed relative error about 1e-7; the
# bound for a float32 sum of n terms is about n * 6e-8 = 2.4e-4 and pairwise summation stays far below.
FLOAT32_MEAN_RTOL = 1e-5
# A low-precision step rounds at most five times per entry (the preconditioned gradient, the
# weight decay sum, the momentum buffer, lr * buffer and the subtraction), each by half an eps of
# a value no larger than max(|theta|, |delta theta|), so the new parameter is within 3 eps of that
# scale of the float32 step on the same inputs. Observed: 1.9 eps (bfloat16 and float16).
LOW_PRECISION_STEP_EPS = 3.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def _loss_fn(model: nn.Module):
    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss_fn


def _batches(count: int, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 2, 4, 4, generator=generator).to(dtype) + 0.5, torch.randint(0, 3, (5,), generator=generator))
            for _ in range(count)]


def _trained(config: macfn.MACConfig, steps: int = 2):
    """Return model, compute, params and state after ``steps`` good steps (non-zero momentum and statistics)."""
    model = _model()
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = None
    for x, y in _batches(steps):
        grads, stats, _ = compute(params, x, y)
        params, state = macfn.step(params, grads, stats, state, config)
    return model, compute, params, state


def _assert_same_tree(actual, expected, skip=()):
    """Assert bitwise equality of two parameter dicts or states, key by key."""
    assert actual.keys() == expected.keys()
    for key in expected:
        if key in skip:
            continue
        if isinstance(expected[key], dict):
            _assert_same_tree(actual[key], expected[key])
        elif isinstance(expected[key], Tensor):
            assert torch.equal(actual[key], expected[key]), f"{key!r} changed"
        else:
            assert actual[key] == expected[key], f"{key!r} changed"


def _poison(kind: str, grads, stats, lr):
    """Put a NaN or infinity into one input; return the inputs and the name the message must give."""
    grads, stats = dict(grads), dict(stats)
    if kind == "nan_linear_weight_grad":
        grads["3.weight"] = grads["3.weight"].clone()
        grads["3.weight"][1, 2] = float("nan")
        return grads, stats, lr, r"gradient '3\.weight' \(1 of 144 entries\)"
    if kind == "inf_conv_bias_grad":
        grads["0.bias"] = grads["0.bias"].clone()
        grads["0.bias"][0] = float("inf")
        return grads, stats, lr, r"gradient '0\.bias' \(1 of 3 entries\)"
    if kind == "neg_inf_conv_weight_grad":
        grads["0.weight"] = torch.full_like(grads["0.weight"], -float("inf"))
        return grads, stats, lr, r"gradient '0\.weight' \(54 of 54 entries\)"
    if kind == "nan_stats":
        stats["3.weight"] = stats["3.weight"].clone()
        stats["3.weight"][0, -2] = float("nan")
        return grads, stats, lr, r"statistics of layer '3\.weight' \(1 of 49 entries\)"
    assert kind == "nan_lr"
    return grads, stats, torch.tensor(float("nan")), r"learning rate 'lr' \(1 of 1 entries\)"


POISON_KINDS = ["nan_linear_weight_grad", "inf_conv_bias_grad", "neg_inf_conv_weight_grad", "nan_stats", "nan_lr"]


# Non-finite policy.


@pytest.mark.parametrize("kind", POISON_KINDS)
def test_skip_leaves_state_unchanged(kind):
    config = macfn.MACConfig()
    _, compute, params, state = _trained(config)
    grads, stats, _ = compute(params, *_batches(3)[2])
    grads, stats, lr, name = _poison(kind, grads, stats, torch.tensor(0.1))

    with pytest.warns(RuntimeWarning, match=r"macfn\.step skipped a step because of non-finite values .*" + name):
        new_params, new_state = macfn.step(params, grads, stats, state, config, lr=lr)

    _assert_same_tree(new_params, params)
    _assert_same_tree(new_state, state, skip=("skipped",))
    assert new_state["step"].item() == 2
    assert new_state["skipped"].item() == 1


def _finite_check_inputs() -> list[Tensor]:
    """Small tensors of three dtypes (concatenated per dtype) and one large tensor (checked alone)."""
    large = torch.zeros(macfn._finite.CONCATENATE_BELOW + 1)
    return [torch.ones(3), torch.full((2, 2), 1e300, dtype=torch.float64), torch.ones(4, dtype=torch.float16),
            torch.tensor(0.5), torch.empty(0), large]


@pytest.mark.parametrize("index", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_entry(index, bad):
    tensors = _finite_check_inputs()
    assert bool(macfn._finite.all_finite(tensors))
    tensors[index].view(-1)[-1] = bad

    assert not bool(macfn._finite.all_finite(tensors))


def test_all_finite_compiled_matches_eager():
    # The traced form tests each tensor on its own instead of concatenating them.
    # It must find the same bad entries as the eager form.
    compiled = torch.compile(lambda tensors: macfn._finite.all_finite(tensors), fullgraph=True)
    assert bool(compiled(_finite_check_inputs()))
    for index in [0, 1, 2, 3, 5]:
        for bad in [float("nan"), float("inf"), -float("inf")]:
            tensors = _finite_check_inputs()
            tensors[index].view(-1)[-1] = bad
            assert not bool(compiled(tensors)), (index, bad)
            assert not bool(macfn._finite.all_finite(tensors)), (index, bad)
    # A finite float64 value beyond the float32 range stays finite in the traced form too.
    tensors = _finite_check_inputs()
    tensors[1].fill_(-1e308)
    assert bool(compiled(tensors))


def test_all_finite_keeps_float64_range():
    # A finite float64 value beyond the float32 range must not be cast into an infinity.
    assert bool(macfn._finite.all_finite([torch.tensor([1e300], dtype=torch.float64), torch.ones(2)]))


def test_all_finite_of_nothing_is_true():
    assert bool(macfn._finite.all_finite([]))
    assert bool(macfn._finite.all_finite([torch.empty(0)]))


def _one_layer_step_inputs(grad_weight: Tensor, mean: list[float]):
    params = {"fc.weight": torch.ones(2, len(mean))}
    grads = {"fc.weight": grad_weight}
    stats = {"fc.weight": torch.tensor([mean])}
    return params, grads, stats


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.compile)])
def test_infinite_gradient_under_zero_mean_activation_is_skipped(compiled):
    # The finite check of a preconditioned layer reads its row products G abar. The infinite
    # entry meets a zero of abar there, and inf * 0 is NaN, so the step is still skipped.
    grad = torch.zeros(2, 3)
    grad[1, 1] = float("inf")
    params, grads, stats = _one_layer_step_inputs(grad, [1.0, 0.0, 2.0])
    config = macfn.MACConfig()
    state = macfn.init(params, config, stats)
    step = torch.compile(macfn.step, fullgraph=True) if compiled else macfn.step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        new_params, new_state = step(params, grads, stats, state, config)

    _assert_same_tree(new_params, params)
    _assert_same_tree(new_state, state, skip=("skipped",))
    assert new_state["skipped"].item() == 1
    if not compiled:
        assert any("gradient 'fc.weight' (1 of 6 entries)" in str(w.message) for w in caught)
    torch._dynamo.reset()


def test_overflowing_row_products_are_skipped_and_named():
    # Every input is finite, but G abar exceeds the float32 range; the update would write NaN.
    params, grads, stats = _one_layer_step_inputs(torch.full((2, 3), 3e38), [10.0, 10.0, 10.0])
    config = macfn.MACConfig()
    state = macfn.init(params, config, stats)
    with pytest.warns(RuntimeWarning, match=r"overflowing row products G abar of layer 'fc\.weight' \(2 of 2 entries\)"):
        new_params, new_state = macfn.step(params, grads, stats, state, config)

    _assert_same_tree(new_params, params)
    assert new_state["skipped"].item() == 1
    with pytest.raises(FloatingPointError, match=r"overflowing row products G abar of layer 'fc\.weight'"):
        macfn.step(params, grads, stats, state, config.replace(nonfinite="raise"))


def test_skipped_steps_do_not_change_trajectory():
    config = macfn.MACConfig(stat_decay=0.9)
    model = _model()
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = _batches(3)

    clean_params, clean_state = start, None
    for x, y in batches:
        grads, stats, _ = compute(clean_params, x, y)
        clean_params, clean_state = macfn.step(clean_params, grads, stats, clean_state, config)

    params, state = start, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for index, (x, y) in enumerate(batches):
            grads, stats, _ = compute(params, x, y)
            if index > 0:
                for kind in ("nan_stats", "inf_conv_bias_grad"):
                    bad = _poison(kind, grads, stats, None)
                    params, state = macfn.step(params, bad[0], bad[1], state, config)
            params, state = macfn.step(params, grads, stats, state, config)

    _assert_same_tree(params, clean_params)
    _assert_same_tree(state, clean_state, skip=("skipped",))
    assert state["skipped"].item() == 4
    assert state["step"].item() == 3


def test_skip_keeps_adamw_moments():
    adamw = macfn.BaseUpdate(params=("0.bias", "3.bias"), rule="adamw", lr_scale=0.1)
    config = macfn.MACConfig(base_updates=(adamw,))
    model = _model()
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = _batches(3)

    clean_params, clean_state = start, None
    for x, y in batches:
        grads, stats, _ = compute(clean_params, x, y)
        clean_params, clean_state = macfn.step(clean_params, grads, stats, clean_state, config)

    params, state = start, None
    for index, (x, y) in enumerate(batches):
        grads, stats, _ = compute(params, x, y)
        if index == 1:
            bad = _poison("inf_conv_bias_grad", grads, stats, None)
            with pytest.warns(RuntimeWarning, match=r"gradient '0\.bias'"):
                skipped_params, skipped_state = macfn.step(params, bad[0], bad[1], state, config)
            _assert_same_tree(skipped_params, params)
            _assert_same_tree(skipped_state, state, skip=("skipped",))
            params, state = skipped_params, skipped_state
        params, state = macfn.step(params, grads, stats, state, config)

    assert "exp_avg" in state
    _assert_same_tree(params, clean_params)
    _assert_same_tree(state, clean_state, skip=("skipped",))


def test_skip_warning_is_rate_limited():
    params = {"w": torch.ones(2, 2)}
    grads = {"w": torch.full((2, 2), float("nan"))}
    state = macfn.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(25):
            params, state = macfn.step(params, grads, None, state)

    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "1 step(s) skipped so far" in messages[0]
    assert "10 step(s) skipped so far" in messages[1]
    assert caught[0].filename == __file__
    assert state["skipped"].item() == 25
    assert state["step"].item() == 0


@pytest.mark.parametrize("kind", POISON_KINDS)
def test_raise_names_offending_tensor(kind):
    config = macfn.MACConfig(nonfinite="raise")
    _, compute, params, state = _trained(config)
    grads, stats, _ = compute(params, *_batches(3)[2])
    grads, stats, lr, name = _poison(kind, grads, stats, torch.tensor(0.1))
    snapshot = copy.deepcopy((params, state))

    with pytest.raises(FloatingPointError, match=r"Non-finite values \(NaN or inf\) in .*" + name + r".* at step 2"):
        macfn.step(params, grads, stats, state, config, lr=lr)

    _assert_same_tree(params, snapshot[0])
    _assert_same_tree(state, snapshot[1])


def test_ignore_applies_nonfinite_update():
    params = {"w": torch.ones(2, 2)}
    grads = {"w": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])}
    config = macfn.MACConfig(nonfinite="ignore")
    new_params, state = macfn.step(params, grads, None, None, config)
    assert torch.isnan(new_params["w"][0, 0])
    assert state["step"].item() == 1
    assert state["skipped"].item() == 0


def test_nan_batch_through_model_is_skipped():
    config = macfn.MACConfig()
    _, compute, params, state = _trained(config)
    x, y = _batches(3)[2]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    grads, stats, loss = compute(params, x, y)
    assert torch.isnan(loss)

    with pytest.warns(RuntimeWarning, match=r"gradient '0\.weight'.*statistics of layer '0\.weight'"):
        new_params, new_state = macfn.step(params, grads, stats, state, config)
    _assert_same_tree(new_params, params)
    _assert_same_tree(new_state, state, skip=("skipped",))


def test_init_creates_skipped_counter():
    state = macfn.init({"w": torch.zeros(2, 2)})
    assert state["skipped"].dtype == torch.int64
    assert state["skipped"].shape == ()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["skipped"].item() == 0


@pytest.mark.compile
def test_compiled_skip_matches_eager():
    torch._dynamo.reset()
    config = macfn.MACConfig(lr=0.1)
    model, compute, params, state = _trained(config, steps=1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(macfn.step, fullgraph=True, backend=counter)

    plan = [None, "nan_linear_weight_grad", None, "nan_stats", "nan_lr", None]
    eager_params, eager_state = params, state
    compiled_params, compiled_state = params, state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for index, kind in enumerate(plan):
            x, y = _batches(len(plan))[index]
            # Both runs use the eager run's gradients, so they differ only in the step.
            grads, stats, _ = compute(eager_params, x, y)
            lr = torch.tensor(0.1 / (1 + index))
            if kind is not None:
                grads, stats, lr, _ = _poison(kind, grads, stats, lr)
            before = compiled_params, compiled_state
            compiled_params, compiled_state = compiled(compiled_params, grads, stats, compiled_state, config, lr=lr)
            eager_params, eager_state = macfn.step(eager_params, grads, stats, eager_state, config, lr=lr)
            if kind is not None:
                _assert_same_tree(compiled_params, before[0])
                _assert_same_tree(compiled_state, before[1], skip=("skipped",))
            for name in params:
                torch.testing.assert_close(compiled_params[name], eager_params[name], rtol=COMPILED_TOLERANCE,
                                           atol=COMPILED_TOLERANCE)
            assert compiled_state["skipped"].item() == eager_state["skipped"].item()
            assert compiled_state["step"].item() == eager_state["step"].item()

    assert compiled_state["skipped"].item() == 3
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    torch._dynamo.reset()


@pytest.mark.compile
def test_compiled_raise_policy_is_rejected():
    torch._dynamo.reset()
    config = macfn.MACConfig(nonfinite="raise")
    params = {"w": torch.ones(2, 2)}
    grads = {"w": torch.ones(2, 2)}
    state = macfn.init(params, config)
    compiled = torch.compile(macfn.step, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"Invalid nonfinite='raise' inside torch\.compile"):
        compiled(params, grads, None, state, config)

    # Without fullgraph the step falls back to eager execution, which raises as eager code does.
    lenient = torch.compile(macfn.step, backend="eager")
    with pytest.raises(FloatingPointError, match=r"gradient 'w'"):
        lenient(params, {"w": torch.full((2, 2), float("nan"))}, None, state, config)
    torch._dynamo.reset()


def _adapter_after_steps(steps: int = 2, **hyperparameters):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    optimizer = macfn.optim.MAC(model, **hyperparameters)
    x = torch.randn(6, 4) + 0.5
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    return model, optimizer


def test_adapter_skip_leaves_model_and_state():
    model, optimizer = _adapter_after_steps()
    model[2].bias.grad[1] = float("nan")
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(optimizer.state_dict())

    with pytest.warns(RuntimeWarning, match=r"gradient '2\.bias' \(1 of 2 entries\)") as caught:
        optimizer.step()

    assert caught[0].filename == __file__, "the warning must point at the caller of optimizer.step"
    _assert_same_tree(model.state_dict(), params_before)
    state_after = optimizer.state_dict()
    for name, entries in state_before["state"].items():
        _assert_same_tree(state_after["state"][name], entries)
    assert state_after["group_state"][0]["step"].item() == 2
    assert state_after["group_state"][0]["skipped"].item() == 1


def test_adapter_skip_covers_every_group():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "weight_decay": 0.0}]
    optimizer = macfn.optim.MAC(model, groups)
    x = torch.randn(6, 4) + 0.5
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()
    model(x).square().mean().backward()
    model[2].bias.grad[0] = float("nan")
    params_before = copy.deepcopy(model.state_dict())

    with pytest.warns(RuntimeWarning, match=r"non-finite values"):
        optimizer.step()

    _assert_same_tree(model.state_dict(), params_before)
    group_state = optimizer.state_dict()["group_state"]
    assert [int(entry["step"]) for entry in group_state] == [2, 2]
    assert [int(entry["skipped"]) for entry in group_state] == [1, 1]


def test_step_finite_flag_from_caller():
    params = {"w": torch.ones(2, 2)}
    config = macfn.MACConfig()
    state = macfn.init(params, config)
    with pytest.warns(RuntimeWarning, match=r"inputs outside this call"):
        new_params, new_state = macfn.step(params, {"w": torch.ones(2, 2)}, None, state, config,
                                           finite=torch.tensor(False))
    assert torch.equal(new_params["w"], params["w"])
    assert int(new_state["skipped"]) == 1
    with pytest.raises(ValueError, match=r"Invalid finite tensor of shape \(2,\)"):
        macfn.step(params, {"w": torch.ones(2, 2)}, None, state, config, finite=torch.ones(2, dtype=torch.bool))


def test_adapter_raise_names_parameter():
    model, optimizer = _adapter_after_steps(nonfinite="raise")
    model[0].weight.grad[0, 0] = float("inf")
    params_before = copy.deepcopy(model.state_dict())
    with pytest.raises(FloatingPointError, match=r"gradient '0\.weight' \(1 of 20 entries\)"):
        optimizer.step()
    _assert_same_tree(model.state_dict(), params_before)


def test_adapter_foreign_checkpoint_loads_nothing():
    model, optimizer = _adapter_after_steps()
    _, other = _adapter_after_steps(steps=3)
    saved = other.state_dict()
    # The last parameter is wrong, so loading entry by entry before checking would change the others.
    saved["state"]["2.bias"]["momentum"] = torch.zeros(7)
    before = copy.deepcopy(optimizer.state_dict())

    with pytest.raises(ValueError, match=r"Invalid state_dict entry '2\.bias'\['momentum'\] of shape \(7,\)"):
        optimizer.load_state_dict(saved)

    after = optimizer.state_dict()
    for name, entries in before["state"].items():
        _assert_same_tree(after["state"][name], entries)
    _assert_same_tree(after["group_state"][0], before["group_state"][0])


@pytest.mark.compile
def test_adapter_compiled_skip():
    torch._dynamo.reset()
    model, optimizer = _adapter_after_steps(compile=True)
    model[2].weight.grad[0, 0] = float("nan")
    params_before = copy.deepcopy(model.state_dict())
    optimizer.step()
    _assert_same_tree(model.state_dict(), params_before)
    assert optimizer.state_dict()["group_state"][0]["skipped"].item() == 1
    torch._dynamo.reset()


# Low precision.


def test_float16_linear_activations_do_not_overflow():
    generator = torch.Generator().manual_seed(2)
    x = (5e3 + 5e3 * torch.rand(4096, 8, generator=generator)).half()
    assert torch.isinf(x.sum(dim=0)).all(), "a float16 sum of these rows must overflow"
    layer = nn.Linear(8, 2).half()
    recorder = macfn.StatsRecorder(layer)
    recorder.start()
    layer(x)
    stats = recorder.stop()

    assert stats["weight"].dtype == torch.float32
    torch.testing.assert_close(stats["weight"].double(), ref.linear_mean(x, bias=True), rtol=FLOAT32_MEAN_RTOL, atol=0)


def test_float16_conv_activations_do_not_overflow():
    generator = torch.Generator().manual_seed(3)
    x = (5e3 + 5e3 * torch.rand(64, 2, 8, 8, generator=generator)).half()
    layer = nn.Conv2d(2, 3, 3, padding=1).half()
    recorder = macfn.StatsRecorder(layer)
    recorder.start()
    layer(x)
    stats = recorder.stop()

    assert stats["weight"].dtype == torch.float32
    expected = ref.conv2d_mean(layer, x)
    torch.testing.assert_close(stats["weight"].double(), expected, rtol=FLOAT32_MEAN_RTOL, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_row_products_do_not_overflow(dtype):
    generator = torch.Generator().manual_seed(4)
    grad = torch.randn(1, 8, 64, generator=generator).to(dtype)
    abar = 1e4 * (1 + torch.rand(1, 64, generator=generator))
    if dtype == torch.float16:
        assert torch.isinf(grad[0].float().half() @ abar[0].half()).any(), "float16 row products must overflow"

    result = macfn._kernels.precondition(grad, abar, 1.0, "decoupled")

    assert result.dtype == dtype
    expected = ref.dense_decoupled(grad[0].double(), abar.double(), 1.0)
    eps = torch.finfo(dtype).eps
    scale = grad[0].double().abs().max()
    torch.testing.assert_close(result[0].double(), expected, rtol=0, atol=eps * scale.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_step_matches_float32(dtype):
    torch.manual_seed(5)
    model = _model().to(dtype)
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    config = macfn.MACConfig(lr=0.1, momentum=0.9, weight_decay=5e-4)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = None
    worst = 0.0
    for x, y in _batches(4, dtype):
        grads, stats, _ = compute(params, x, y)
        assert all(mean.dtype == torch.float32 for mean in stats.values())
        upcast = {name: p.float() for name, p in params.items()}
        upcast_grads = {name: g.float() for name, g in grads.items()}
        upcast_state = None
        if state is not None:
            upcast_state = {**state, "momentum": {name: b.float() for name, b in state["momentum"].items()}}

        new_params, state = macfn.step(params, grads, stats, state, config)
        expected, _ = macfn.step(upcast, upcast_grads, stats, upcast_state, config)

        for name, theta in params.items():
            assert new_params[name].dtype == dtype
            assert state["momentum"][name].dtype == dtype
            scale = torch.maximum(theta.float().abs(), (expected[name] - theta.float()).abs())
            error = (new_params[name].float() - expected[name]).abs()
            bound = LOW_PRECISION_STEP_EPS * torch.finfo(dtype).eps * scale
            assert (error <= bound).all(), f"{name}: {(error / (torch.finfo(dtype).eps * scale)).max():.2f} eps"
            worst = max(worst, (error / (torch.finfo(dtype).eps * scale.clamp_min(1e-30))).max().item())
        assert all(mean.dtype == torch.float32 for mean in state["mean_activation"].values())
        params = new_params
    assert worst > 0.0, "the low-precision step must round somewhere, or this test compares float32 to itself"


# Degenerate input.


def _dense_check(model: nn.Module, x: Tensor, config: macfn.MACConfig, steps: int = 2) -> None:
    """Train ``model`` in float64 with macfn and with the dense reference; assert equal parameters."""
    model = model.double()
    x = x.double()
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).square().mean())
    dense = DenseMAC(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                     damping=config.damping, stat_decay=config.stat_decay)
    params = dense.params()
    state = None
    for _ in range(steps):
        grads, stats, _ = compute(params, x)
        params, state = macfn.step(params, grads, stats, state, config)
        expected = dense.step(lambda m: m(x).square().mean())
        for name in expected:
            torch.testing.assert_close(params[name], expected[name], rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


DEGENERATE_CONFIG = macfn.MACConfig(lr=0.2, momentum=0.9, weight_decay=1e-3, damping=0.5, stat_decay=0.9)


def test_batch_of_one_matches_dense():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    _dense_check(model, torch.randn(1, 2, 5, 5) + 0.5, DEGENERATE_CONFIG)


def test_sequence_of_length_one_matches_dense():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 2))
    _dense_check(model, torch.randn(4, 1, 6) + 0.5, DEGENERATE_CONFIG)


def test_one_by_one_conv_matches_dense():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1, stride=2, bias=False))
    _dense_check(model, torch.randn(2, 3, 5, 5) + 0.5, DEGENERATE_CONFIG)


def test_zero_activations_match_dense():
    model = nn.Linear(4, 3)
    x = torch.zeros(5, 4)
    _dense_check(model, x, DEGENERATE_CONFIG)

    layer = nn.Linear(4, 3, bias=False)
    compute = macfn.grad_and_stats(layer, lambda p, inputs: functional_call(layer, p, (inputs,)).sum())
    params = {name: p.detach().clone() for name, p in layer.named_parameters()}
    grads, stats, _ = compute(params, x)
    assert torch.equal(stats["weight"], torch.zeros(1, 4))
    new_params, _ = macfn.step(params, grads, stats, None, macfn.MACConfig(weight_decay=0.0))
    assert torch.equal(new_params["weight"], params["weight"]), "a zero input gives a zero weight gradient"


def test_frozen_layer_with_none_grads():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).square().sum())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(6, 4) + 0.5
    config = macfn.MACConfig()
    state = None
    new_params = params
    for _ in range(2):
        grads, stats, _ = compute(new_params, x)
        # torch.func differentiates every input; the caller passes None for frozen parameters.
        grads = {name: (None if not dict(model.named_parameters())[name].requires_grad else g)
                 for name, g in grads.items()}
        new_params, state = macfn.step(new_params, grads, stats, state, config)

    for name in ("0.weight", "0.bias"):
        assert torch.equal(new_params[name], params[name])
        assert torch.equal(state["momentum"][name], torch.zeros_like(params[name]))
    for name in ("2.weight", "2.bias"):
        assert not torch.equal(new_params[name], params[name])


def test_frozen_layer_left_out_of_params_is_explained():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("2.")}
    grads, stats, _ = compute(trainable, torch.randn(3, 4))
    assert set(grads) == set(trainable)
    with pytest.raises(ValueError, match=r"no parameter named '0\.weight'.*For a frozen layer, keep its parameters in "
                                         r"params with a None gradient, or drop its statistics"):
        macfn.step(trainable, grads, stats)
    del stats["0.weight"]
    new_params, _ = macfn.step(trainable, grads, stats)
    assert new_params.keys() == trainable.keys()


def test_weight_grad_none_with_bias_grad():
    params = {"fc.weight": torch.randn(3, 4), "fc.bias": torch.randn(3)}
    grads = {"fc.weight": None, "fc.bias": torch.randn(3)}
    stats = {"fc.weight": torch.randn(1, 5)}
    new_params, state = macfn.step(params, grads, stats)
    assert torch.equal(new_params["fc.weight"], params["fc.weight"])
    assert torch.isfinite(new_params["fc.bias"]).all()
    assert not torch.equal(new_params["fc.bias"], params["fc.bias"])


def test_empty_params():
    state = macfn.init({})
    new_params, new_state = macfn.step({}, {}, None, state)
    assert new_params == {}
    assert new_state["step"].item() == 1
    new_params, new_state = macfn.step({}, {}, {}, new_state)
    assert new_state["step"].item() == 2


def test_model_without_preconditioned_layers_is_sgd():
    model = nn.Sequential(nn.LayerNorm(4), nn.Tanh())
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads, stats, _ = compute(params, torch.randn(3, 4))
    assert stats == {}
    config = macfn.MACConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    new_params, _ = macfn.step(params, grads, stats, None, config)
    for name in params:
        torch.testing.assert_close(new_params[name], params[name] - 0.1 * grads[name])


def test_noncontiguous_inputs_match_contiguous():
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(4, 3, generator=generator).t()  # [3, 4], transposed strides
    bias = torch.randn(3, 2, generator=generator)[:, 0]  # stride 2
    grad_weight = torch.randn(4, 3, generator=generator).t()
    grad_bias = torch.randn(3, 2, generator=generator)[:, 1]
    stats = {"fc.weight": torch.randn(5, 2, generator=generator).t()[:1]}
    assert not weight.is_contiguous() and not grad_weight.is_contiguous() and not bias.is_contiguous()

    params = {"fc.weight": weight, "fc.bias": bias}
    grads = {"fc.weight": grad_weight, "fc.bias": grad_bias}
    contiguous = ({name: t.contiguous() for name, t in params.items()},
                  {name: t.contiguous() for name, t in grads.items()},
                  {name: t.contiguous() for name, t in stats.items()})
    config = macfn.MACConfig()
    state = macfn.init(params, config, stats)
    for _ in range(2):
        params, state = macfn.step(params, grads, stats, state, config)
    expected_params, expected_state = contiguous[0], macfn.init(contiguous[0], config, contiguous[2])
    for _ in range(2):
        expected_params, expected_state = macfn.step(expected_params, contiguous[1], contiguous[2], expected_state,
                                                     config)
    for name in params:
        torch.testing.assert_close(params[name], expected_params[name], rtol=1e-6, atol=1e-7)


def test_channels_last_model_matches_contiguous():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6) + 0.5
    results = []
    for net, inputs in ((model, x), (twin, x.to(memory_format=torch.channels_last))):
        compute = macfn.grad_and_stats(net, lambda p, xs, net=net: functional_call(net, p, (xs,)).square().mean())
        params = {name: p.detach().clone(memory_format=torch.preserve_format) for name, p in net.named_parameters()}
        state = None
        for _ in range(2):
            grads, stats, _ = compute(params, inputs)
            params, state = macfn.step(params, grads, stats, state, macfn.MACConfig())
        results.append(params)
    assert dict(twin.named_parameters())["0.weight"].is_contiguous(memory_format=torch.channels_last)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)


# Hyperparameter and structure errors: each raises before anything changes.


def _error_cases():
    params = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}
    grads = {"fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}
    stats = {"fc.weight": torch.ones(1, 5)}
    state = macfn.init(params, macfn.MACConfig(), stats)
    old_format = {key: value for key, value in state.items() if key != "skipped"}
    wrong_buffer = {**state, "momentum": {**state["momentum"], "fc.weight": torch.zeros(4, 3)}}
    wrong_counts = {**state, "stat_count": {}}
    wrong_step = {**state, "step": 3}
    return params, grads, stats, state, [
        ("lr_nan", dict(lr=float("nan")), r"Invalid lr=nan: the learning rate must be a finite number >= 0"),
        ("lr_inf", dict(lr=float("inf")), r"Invalid lr=inf"),
        ("lr_bool", dict(lr=True), r"Invalid lr=True"),
        ("lr_string", dict(lr="0.1"), r"Invalid lr='0\.1'"),
        ("lr_vector", dict(lr=torch.tensor([0.1, 0.2])),
         r"Invalid lr tensor of shape \(2,\) and dtype torch\.float32: expected a 0-dim floating tensor"),
        ("lr_integer_tensor", dict(lr=torch.tensor(1)), r"Invalid lr tensor of shape \(\) and dtype torch\.int64"),
        ("grad_dtype", dict(grads={**grads, "fc.bias": torch.ones(3, dtype=torch.float64)}),
         r"Invalid grads\['fc\.bias'\] of dtype torch\.float64: the parameter has dtype torch\.float32; cast the "
         r"gradient with \.to\(param\.dtype\)"),
        ("state_old_format", dict(state=old_format),
         r"Invalid state with keys \['mean_activation', 'momentum', 'stat_count', 'step'\]: expected the dict made "
         r"by macfn\.init"),
        ("momentum_shape", dict(state=wrong_buffer),
         r"Invalid state\['momentum'\]\['fc\.weight'\] of shape \(4, 3\): the parameter has shape \(3, 4\); the "
         r"state belongs to another model"),
        ("stat_count_keys", dict(state=wrong_counts),
         r"Invalid state: stat_count has layers \[\] but mean_activation has \['fc\.weight'\]"),
        ("step_not_tensor", dict(state=wrong_step), r"Invalid state\['step'\]: expected a 0-dim int64 tensor"),
    ]


@pytest.mark.parametrize("case", [case[0] for case in _error_cases()[4]])
def test_bad_input_raises_before_any_change(case):
    params, grads, stats, state, cases = _error_cases()
    _, _ = macfn.step(params, grads, stats, state)  # the valid call works
    changes, message = next((changes, message) for name, changes, message in cases if name == case)
    call = dict(params=params, grads=grads, stats=stats, state=state, config=macfn.MACConfig(), lr=None) | changes
    snapshots = copy.deepcopy((params, grads, stats, state, call["state"]))
    versions = [t._version for tree in (params, grads, stats) for t in tree.values()]

    with pytest.raises(ValueError, match=message):
        macfn.step(call["params"], call["grads"], call["stats"], call["state"], call["config"], lr=call["lr"])

    for before, after in zip(snapshots, (params, grads, stats, state, call["state"])):
        _assert_same_tree(after, before)
    assert versions == [t._version for tree in (params, grads, stats) for t in tree.values()]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nonfinite", "warn", r"Invalid nonfinite='warn': expected one of 'skip', 'raise', 'ignore'"),
        ("nonfinite", None, r"Invalid nonfinite=None"),
        ("lr", float("nan"), r"Invalid lr=nan: expected a finite number >= 0"),
        ("momentum", -0.5, r"Invalid momentum=-0\.5: it must lie in \[0, 1\)"),
        ("stat_decay", float("inf"), r"Invalid stat_decay=inf: expected a number in \[0, 1\)"),
        ("damping", "1.0", r"Invalid damping='1\.0': expected a finite number > 0"),
    ],
)
def test_config_rejects_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        macfn.MACConfig(**{field: value})


# Checkpoints.


def test_truncated_checkpoint_raises(tmp_path):
    _, _, _, state = _trained(macfn.MACConfig())
    path = tmp_path / "state.pt"
    torch.save(state, path)
    data = path.read_bytes()
    for fraction in (0.1, 0.5, 0.9, 0.999):
        cut = tmp_path / f"cut-{fraction}.pt"
        cut.write_bytes(data[: int(len(data) * fraction)])
        # torch 2.13 raises RuntimeError ("failed reading zip archive") or OSError, by where the cut falls.
        with pytest.raises((RuntimeError, OSError)):
            torch.load(cut, weights_only=True)


def test_foreign_checkpoint_raises_before_any_change(tmp_path):
    model, compute, params, state = _trained(macfn.MACConfig())
    grads, stats, _ = compute(params, *_batches(3)[2])

    torch.save(model.state_dict(), tmp_path / "weights.pt")
    not_a_state = torch.load(tmp_path / "weights.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"Invalid state with keys \['0\.bias', '0\.weight', '3\.bias', '3\.weight'\]"):
        macfn.step(params, grads, stats, not_a_state)

    other = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    other_params = {name: p.detach() for name, p in other.named_parameters()}
    torch.save(macfn.init(other_params, macfn.MACConfig()), tmp_path / "other.pt")
    foreign = torch.load(tmp_path / "other.pt", weights_only=True)
    snapshot = copy.deepcopy(foreign)
    with pytest.raises(ValueError, match=r"Invalid state\['momentum'\]\['3\.weight'\] of shape \(5, 48\): the parameter has shape \(3, 48\)"):
        macfn.step(params, grads, stats, foreign)
    _assert_same_tree(foreign, snapshot)


class _TouchOnLoad:
    """Pickles as a call to ``Path.touch(marker)``: code that runs when the file is unpickled."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_only_load_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "payload.pt"
    state = macfn.init({"w": torch.zeros(2)})
    torch.save({**state, "momentum": {"w": _TouchOnLoad(marker)}}, path)

    with pytest.raises(Exception, match=r"Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()

    # The payload is real: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_resume_between_refreshes_is_bitwise(tmp_path):
    config = macfn.MACConfig(stat_decay=0.9)
    model = _model()
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    batches = _batches(6)

    def run(params, state, indices):
        for index in indices:
            grads, stats, _ = compute(params, *batches[index])
            if index == 1:
                grads = {**grads, "3.bias": torch.full_like(grads["3.bias"], float("nan"))}
            params, state = macfn.step(params, grads, stats if index % 2 == 0 else None, state, config)
        return params, state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        straight_params, straight_state = run(start, macfn.init(start, config), range(6))
        params, state = run(start, macfn.init(start, config), range(3))
        torch.save({"params": params, "state": state}, tmp_path / "checkpoint.pt")
        loaded = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        resumed_params, resumed_state = run(loaded["params"], loaded["state"], range(3, 6))

    _assert_same_tree(resumed_params, straight_params)
    _assert_same_tree(resumed_state, straight_state)
    assert resumed_state["skipped"].item() == 1


# The reliability guide's examples run as written.


def _guide_blocks() -> list[str]:
    guide = pathlib.Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
    return re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("index", range(len(_guide_blocks())))
def test_reliability_guide_example_runs(index):
    exec(compile(_guide_blocks()[index], f"reliability.md[{index}]", "exec"), {})
