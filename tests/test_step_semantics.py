"""Semantics of macfn.step: the SGD limit, purity, statistics schedule and state checkpoints."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

import macfn

# float32 models; updates agree up to reassociation in the rank-one correction.
FLOAT32_TOLERANCE = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 2, 5, 5, generator=generator) + 1.0, torch.randint(0, 4, (6,), generator=generator))
            for _ in range(count)]


def _loss_fn(model: nn.Module):
    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss_fn


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("limit", ["huge_damping", "zero_activation"])
def test_step_reduces_to_sgd(limit, nesterov):
    model = _model()
    reference = copy.deepcopy(model)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
    damping = 1e12 if limit == "huge_damping" else 1.0
    config = macfn.MACConfig(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, damping=damping)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    state = None

    for x, y in _batches(4):
        grads, stats, _ = compute(params, x, y)
        if limit == "zero_activation":
            stats = {name: torch.zeros_like(mean) for name, mean in stats.items()}
        before = {name: p.clone() for name, p in params.items()}
        params, state = macfn.step(params, grads, stats, state, config)

        sgd.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        reference_before = {name: p.detach().clone() for name, p in reference.named_parameters()}
        sgd.step()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(params[name] - before[name], p.detach() - reference_before[name],
                                       rtol=FLOAT32_TOLERANCE, atol=1e-7)


def test_step_leaves_inputs_unchanged():
    model = _model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    x, y = _batches(1)[0]
    grads, stats, _ = compute(params, x, y)
    state = macfn.init(params, macfn.MACConfig(), stats)
    _, state = macfn.step(params, grads, stats, state)  # non-zero momentum and statistics

    snapshots = [copy.deepcopy(tree) for tree in (params, grads, stats, state)]
    versions = [t._version for tree in (params, grads, stats) for t in tree.values()]
    macfn.step(params, grads, stats, state)
    macfn.step(params, grads, None, state)

    for before, after in zip(snapshots, (params, grads, stats, state)):
        for key in before:
            if isinstance(before[key], dict):
                for name in before[key]:
                    assert torch.equal(before[key][name], after[key][name]), f"state[{key!r}][{name!r}] changed"
            else:
                assert torch.equal(before[key], after[key]), f"{key!r} changed"
    assert versions == [t._version for tree in (params, grads, stats) for t in tree.values()]


def test_stats_none_reuses_running_average():
    model = _model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    config = macfn.MACConfig(stat_decay=0.9)
    (x0, y0), (x1, y1) = _batches(2)
    grads, stats, _ = compute(params, x0, y0)
    params, state = macfn.step(params, grads, stats, None, config)

    grads, _, _ = compute(params, x1, y1)
    _, after_none = macfn.step(params, grads, None, state, config)

    for name in state["mean_activation"]:
        assert torch.equal(after_none["mean_activation"][name], state["mean_activation"][name])
        assert after_none["stat_count"][name].item() == 1
    assert after_none["step"].item() == 2


def test_running_average_bias_correction():
    model = _model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    config = macfn.MACConfig(stat_decay=0.95)
    batches = _batches(3)
    state = None
    history = []
    for x, y in batches:
        grads, stats, _ = compute(params, x, y)
        history.append(stats)
        params, state = macfn.step(params, grads, stats, state, config)

    for name in history[0]:
        beta = config.stat_decay
        expected = sum((1 - beta) * beta ** (2 - k) * history[k][name] for k in range(3))
        torch.testing.assert_close(state["mean_activation"][name], expected)
        assert state["stat_count"][name].item() == 3


def test_state_round_trips_weights_only(tmp_path):
    model = _model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, _loss_fn(model))
    x, y = _batches(1)[0]
    grads, stats, _ = compute(params, x, y)
    new_params, state = macfn.step(params, grads, stats, None, macfn.MACConfig())

    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)

    assert loaded.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, dict):
            assert loaded[key].keys() == value.keys()
            for name in value:
                assert torch.equal(loaded[key][name], value[name])
        else:
            assert torch.equal(loaded[key], value)
    again_from_loaded, _ = macfn.step(new_params, grads, stats, loaded)
    again_from_state, _ = macfn.step(new_params, grads, stats, state)
    for name in params:
        assert torch.equal(again_from_loaded[name], again_from_state[name])


def test_decoupled_weight_decay_shrinks_parameters():
    param = torch.tensor([[2.0, -1.0]])
    config = macfn.MACConfig(lr=0.1, momentum=0.0, weight_decay=0.5, decoupled_weight_decay=True)
    new_params, _ = macfn.step({"w": param}, {"w": torch.zeros_like(param)}, None, None, config)
    torch.testing.assert_close(new_params["w"], param * (1 - 0.1 * 0.5))


def test_none_grad_leaves_parameter_and_momentum():
    params = {"a": torch.ones(3), "b": torch.ones(3)}
    config = macfn.MACConfig(lr=0.1)
    state = macfn.init(params, config)
    new_params, new_state = macfn.step(params, {"a": torch.ones(3), "b": None}, None, state, config)
    assert torch.equal(new_params["b"], params["b"])
    assert torch.equal(new_state["momentum"]["b"], state["momentum"]["b"])
    assert not torch.equal(new_params["a"], params["a"])


def test_lr_tensor_matches_float():
    params = {"w": torch.randn(3, 2)}
    grads = {"w": torch.randn(3, 2)}
    from_float, _ = macfn.step(params, grads, None, None, macfn.MACConfig(lr=0.3))
    from_tensor, _ = macfn.step(params, grads, None, None, macfn.MACConfig(), lr=torch.tensor(0.3))
    torch.testing.assert_close(from_float["w"], from_tensor["w"])


def test_state_save_load_through_buffer():
    state = macfn.init({"w": torch.zeros(2, 2)}, macfn.MACConfig())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["step"].item() == 0
