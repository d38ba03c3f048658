"""Per-group base updates: AdamW and SGD groups against torch.optim, purity, state files and compile."""

from __future__ import annotations

import io

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.func import functional_call

import macfn

# float64 on both sides; torch.optim's foreach kernels sum in another order (observed below 1e-15).
FLOAT64_TOLERANCE = 1e-12
# Inductor fuses the float32 AdamW arithmetic differently from eager (observed ~1e-7 after 5 steps).
COMPILED_TOLERANCE = 1e-5


def _params(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(5, 3, generator=generator, dtype=dtype),
        "norm": torch.randn(3, generator=generator, dtype=dtype),
        "bias": torch.randn(4, generator=generator, dtype=dtype),
        "fc.weight": torch.randn(4, 3, generator=generator, dtype=dtype),
    }


def _grads(params: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + index)
    return {name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in params.items()}


def _run_macfn(config: macfn.MACConfig, steps: int, lrs: list[float]) -> dict[str, torch.Tensor]:
    params = _params()
    state = macfn.init(params, config)
    for index in range(steps):
        params, state = macfn.step(params, _grads(params, index), None, state, config, lr=lrs[index])
    return params


def _run_torch(groups: list[dict], optimizer_type: type, steps: int, lrs: list[float]) -> dict[str, torch.Tensor]:
    params = {name: p.clone().requires_grad_() for name, p in _params().items()}
    param_groups = [{**group, "params": [params[name] for name in group["params"]]} for group in groups]
    optimizer = optimizer_type(param_groups)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    for index in range(steps):
        grads = _grads({name: p.detach() for name, p in params.items()}, index)
        for name, p in params.items():
            p.grad = grads[name]
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lrs[index] / lrs[0]
        optimizer.step()
    return {name: p.detach() for name, p in params.items()}


def test_adamw_group_matches_torch_adamw():
    lrs = [0.1, 0.08, 0.05, 0.05]
    group = macfn.BaseUpdate(("embed", "norm"), rule="adamw", lr_scale=0.01, weight_decay=0.1, betas=(0.8, 0.99),
                             eps=1e-6)
    config = macfn.MACConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, base_updates=(group,))
    ours = _run_macfn(config, 4, lrs)
    theirs = _run_torch(
        [{"params": ["embed", "norm"], "lr": 0.001, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}],
        torch.optim.AdamW, 4, lrs,
    )
    for name in ("embed", "norm"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_sgd_groups_match_torch_sgd():
    lrs = [0.1, 0.1, 0.02]
    config = macfn.MACConfig(
        lr=0.1, momentum=0.9, weight_decay=5e-4,
        base_updates=(macfn.BaseUpdate(("norm", "bias"), lr_scale=0.5, weight_decay=0.0),),
    )
    ours = _run_macfn(config, 3, lrs)
    theirs = _run_torch(
        [{"params": ["norm", "bias"], "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
         {"params": ["embed", "fc.weight"], "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}],
        torch.optim.SGD, 3, lrs,
    )
    torch.testing.assert_close(ours, theirs, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_no_groups_keeps_state_layout():
    state = macfn.init(_params(), macfn.MACConfig())
    assert "exp_avg" not in state
    assert "exp_avg_sq" not in state
    assert set(state["momentum"]) == set(_params())


def test_adamw_group_state_layout():
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(["embed"], rule="adamw"),))
    state = macfn.init(_params(), config)
    assert set(state["exp_avg"]) == set(state["exp_avg_sq"]) == {"embed"}
    assert "embed" not in state["momentum"]
    assert config.base_updates[0].params == ("embed",)
    with pytest.raises(ValueError, match="expected the dict made by macfn.init with the same config"):
        macfn.step(_params(), _grads(_params(), 0), None, macfn.init(_params(), macfn.MACConfig()), config)


def test_preconditioned_weight_in_adamw_group_uses_preconditioned_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = torch.randn(6, 3, dtype=torch.float64) + 2.0
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).square().sum())
    grads, stats, _ = compute(params, x)
    config = macfn.MACConfig(lr=0.1, damping=0.3, stat_decay=0.0,
                             base_updates=(macfn.BaseUpdate(("weight", "bias"), rule="adamw", weight_decay=0.0),))
    new_params, state = macfn.step(params, grads, stats, None, config)
    # AdamW's first moment after one step is (1 - b1) times the preconditioned gradient.
    rows = torch.cat([grads["weight"], grads["bias"][:, None]], dim=1)
    abar = torch.cat([x.mean(0), torch.ones(1, dtype=torch.float64)])
    expected = rows - (rows @ abar)[:, None] * abar[None, :] / (0.3 + abar @ abar)
    torch.testing.assert_close(state["exp_avg"]["weight"], 0.1 * expected[:, :-1], rtol=FLOAT64_TOLERANCE,
                               atol=FLOAT64_TOLERANCE)
    assert not torch.equal(new_params["weight"], params["weight"])


def test_step_with_groups_is_pure():
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(("embed", "norm"), rule="adamw", lr_scale=0.01),
                                           macfn.BaseUpdate(("bias",), weight_decay=0.0)))
    params = _params()
    state = macfn.init(params, config)
    params, state = macfn.step(params, _grads(params, 0), None, state, config)
    grads = _grads(params, 1)
    snapshot = ({k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in grads.items()},
                torch.utils._pytree.tree_map(lambda t: t.clone(), state))
    first = macfn.step(params, grads, None, state, config)
    second = macfn.step(params, grads, None, state, config)
    torch.testing.assert_close(first, second, rtol=0.0, atol=0.0)
    torch.testing.assert_close((params, grads, state), snapshot, rtol=0.0, atol=0.0)


def test_state_with_adamw_round_trips_through_file():
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(("embed",), rule="adamw"),))
    params = _params()
    state = macfn.init(params, config)
    params, state = macfn.step(params, _grads(params, 0), None, state, config)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    grads = _grads(params, 1)
    torch.testing.assert_close(macfn.step(params, grads, None, loaded, config),
                               macfn.step(params, grads, None, state, config), rtol=0.0, atol=0.0)


def test_skipped_step_keeps_adamw_moments():
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(("embed",), rule="adamw"),))
    params = _params()
    params, state = macfn.step(params, _grads(params, 0), None, macfn.init(params, config), config)
    grads = _grads(params, 1)
    grads["norm"] = torch.full_like(grads["norm"], float("nan"))
    with pytest.warns(RuntimeWarning, match="skipped a step"):
        _, skipped = macfn.step(params, grads, None, state, config)
    assert torch.equal(skipped["exp_avg"]["embed"], state["exp_avg"]["embed"])
    assert int(skipped["step"]) == int(state["step"])


@pytest.mark.compile
def test_step_with_groups_compiles_once():
    torch._dynamo.reset()
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(("embed", "norm"), rule="adamw", lr_scale=0.01),
                                           macfn.BaseUpdate(("bias",), weight_decay=0.0)))
    params = _params(torch.float32)
    state = macfn.init(params, config)

    def step(p, s, grads, lr):
        return macfn.step(p, grads, None, s, config, lr=lr)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_params, eager_state = params, state
    for index in range(5):
        grads = _grads(params, index)
        lr = torch.tensor(0.1 / (index + 1))
        params, state = compiled(params, state, grads, lr)
        eager_params, eager_state = step(eager_params, eager_state, grads, lr)
    torch.testing.assert_close(params, eager_params, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)
    torch.testing.assert_close(state, eager_state, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_base_update_rejects_bad_input():
    with pytest.raises(ValueError, match="expected a tuple of parameter names"):
        macfn.BaseUpdate("embed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid BaseUpdate rule='adam'"):
        macfn.BaseUpdate(("embed",), rule="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid betas\[1\]=1.0"):
        macfn.BaseUpdate(("embed",), rule="adamw", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid eps=0"):
        macfn.BaseUpdate(("embed",), eps=0.0)
    with pytest.raises(ValueError, match="Invalid lr_scale=-1"):
        macfn.BaseUpdate(("embed",), lr_scale=-1.0)
    with pytest.raises(ValueError, match="'embed' belong to more than one group"):
        macfn.MACConfig(base_updates=(macfn.BaseUpdate(("embed",)), macfn.BaseUpdate(("embed", "norm"))))
    with pytest.raises(ValueError, match="expected a tuple of macfn.BaseUpdate"):
        macfn.MACConfig(base_updates=("embed",))  # type: ignore[arg-type]
    config = macfn.MACConfig(base_updates=(macfn.BaseUpdate(("missing",), rule="adamw"),))
    with pytest.raises(ValueError, match="no parameter named 'missing'"):
        macfn.init(_params(), config)
