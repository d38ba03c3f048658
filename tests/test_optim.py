"""macfn.optim.MAC against the functional core, torch.optim.SGD and float64 references."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.func import functional_call

import macfn
import macfn.optim
from tests._reference import conv2d_mean, dense_decoupled, layer_grad_rows, linear_mean

# float32 updates that agree up to reassociation of sums (micro-batches against one batch,
# huge damping against SGD); observed differences are below 2e-7.
FLOAT32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
        nn.LayerNorm(3),
    )


def _batches(count: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 2, 5, 5, generator=generator) + 0.5, torch.randint(0, 3, (size,), generator=generator))
            for _ in range(count)]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _functional_trajectory(model, batches, config, stats_interval, lrs):
    """Run macfn.grad_and_stats and macfn.step; return the parameters after every step."""
    params = _params(model)

    def loss_fn(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    compute = macfn.grad_and_stats(model, loss_fn)
    state = None
    trajectory = []
    for index, (x, y) in enumerate(batches):
        grads, stats, _ = compute(params, x, y)
        if state is None:
            state = macfn.init(params, config, stats)
        refresh = stats if index % stats_interval == 0 else None
        params, state = macfn.step(params, grads, refresh, state, config, lr=lrs[index])
        trajectory.append(dict(params))
    compute.remove()
    return trajectory


def test_adapter_matches_functional_step():
    batches = _batches(6)
    reference = _model()
    model = _model()
    optimizer = macfn.optim.MAC(model, lr=0.1, weight_decay=1e-3, stats_interval=2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    config = macfn.MACConfig(weight_decay=1e-3)
    lrs = [0.1 * 0.5 ** (index // 2) for index in range(len(batches))]
    expected = _functional_trajectory(reference, batches, config, stats_interval=2, lrs=lrs)

    for (x, y), target in zip(batches, expected):
        _train_step(model, optimizer, x, y)
        scheduler.step()
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), target[name]), name


def test_param_groups_match_base_updates():
    batches = _batches(4)
    reference = _model()
    model = _model()
    no_decay = ["0.bias", "3.bias", "4.weight", "4.bias"]
    decay = [name for name, _ in model.named_parameters() if name not in no_decay]
    optimizer = macfn.optim.MAC(
        model, [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1, weight_decay=1e-2
    )
    config = macfn.MACConfig(weight_decay=1e-2, base_updates=(macfn.BaseUpdate(tuple(no_decay), weight_decay=0.0),))
    expected = _functional_trajectory(reference, batches, config, stats_interval=1, lrs=[0.1] * len(batches))

    for (x, y), target in zip(batches, expected):
        _train_step(model, optimizer, x, y)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), target[name], rtol=0, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_huge_damping_matches_sgd(nesterov):
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = macfn.optim.MAC(model, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov, damping=1e12)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)

    for x, y in _batches(4):
        before = _params(model)
        _train_step(model, optimizer, x, y)
        reference_before = _params(reference)
        _train_step(reference, sgd, x, y)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.detach() - before[name], q.detach() - reference_before[name],
                                       **FLOAT32_TOLERANCE)


def test_closure_gives_same_step():
    x, y = _batches(1)[0]
    plain, with_closure = _model(), _model()
    plain_optimizer = macfn.optim.MAC(plain)
    closure_optimizer = macfn.optim.MAC(with_closure)

    def closure():
        closure_optimizer.zero_grad()
        loss = F.cross_entropy(with_closure(x), y)
        loss.backward()
        return loss

    _train_step(plain, plain_optimizer, x, y)
    loss = closure_optimizer.step(closure)

    assert isinstance(loss, torch.Tensor)
    for p, q in zip(plain.parameters(), with_closure.parameters()):
        assert torch.equal(p, q)


def test_step_uses_clipped_gradients():
    x, y = _batches(1)[0]
    model, reference = _model(), _model()
    optimizer = macfn.optim.MAC(model, momentum=0.0, weight_decay=0.0)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.01)
    assert norm > 0.01  # the clip is active
    before = _params(model)
    clipped = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()

    params = _params(reference)
    _, stats, _ = macfn.grad_and_stats(reference, lambda p, a, b: F.cross_entropy(functional_call(reference, p, (a,)), b))(
        params, x, y
    )
    expected, _ = macfn.step(before, clipped, stats, None, macfn.MACConfig(momentum=0.0, weight_decay=0.0))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


def test_capture_skips_eval_and_no_grad():
    batches = _batches(3)
    plain, noisy = _model(), _model()
    plain_optimizer = macfn.optim.MAC(plain)
    noisy_optimizer = macfn.optim.MAC(noisy)
    probe = torch.randn(5, 2, 5, 5) * 10.0

    for x, y in batches:
        _train_step(plain, plain_optimizer, x, y)
        noisy_optimizer.zero_grad()
        with torch.no_grad():
            noisy(probe)  # training mode without gradients
        noisy.eval()
        noisy(probe)  # evaluation mode with gradients
        noisy.train()
        F.cross_entropy(noisy(x), y).backward()
        noisy_optimizer.step()

    for p, q in zip(plain.parameters(), noisy.parameters()):
        assert torch.equal(p, q)
    plain_state = plain_optimizer.state_dict()["state"]
    noisy_state = noisy_optimizer.state_dict()["state"]
    assert torch.equal(plain_state["3.weight"]["mean_activation"], noisy_state["3.weight"]["mean_activation"])


def test_equal_micro_batches_match_full_batch():
    (x, y), = _batches(1)
    full, accumulated = _model(), _model()
    full_optimizer = macfn.optim.MAC(full)
    accumulated_optimizer = macfn.optim.MAC(accumulated)

    _train_step(full, full_optimizer, x, y)
    accumulated_optimizer.zero_grad()
    for part in range(2):
        rows = slice(part * 4, (part + 1) * 4)
        (F.cross_entropy(accumulated(x[rows]), y[rows]) / 2).backward()
    accumulated_optimizer.step()

    for p, q in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q, **FLOAT32_TOLERANCE)


def test_unequal_micro_batches_pool_rows():
    (x, y), = _batches(1)
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = macfn.optim.MAC(model)
    optimizer.zero_grad()
    for rows in (slice(0, 5), slice(5, 8)):
        F.cross_entropy(model(x[rows]), y[rows]).backward()
    optimizer.step()

    hidden = reference[2](reference[1](reference[0](x)))
    expected = {"0.weight": conv2d_mean(reference[0], x), "3.weight": linear_mean(hidden, bias=True)}
    state = optimizer.state_dict()["state"]
    stat_decay = optimizer.param_groups[0]["stat_decay"]
    for name, mean in expected.items():
        running = state[name]["mean_activation"].double() / (1 - stat_decay)
        torch.testing.assert_close(running, mean, rtol=1e-6, atol=1e-7)


def test_autocast_bfloat16_keeps_float32_arithmetic():
    (x, y), = _batches(1)
    model = _model()
    optimizer = macfn.optim.MAC(model, momentum=0.0, weight_decay=0.0)
    before = _params(model)
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[2](model[1](model[0](x)))
        F.cross_entropy(model[4](model[3](hidden)), y).backward()
    assert hidden.dtype == torch.bfloat16
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()

    state = optimizer.state_dict()["state"]
    abar = state["3.weight"]["mean_activation"].double() / (1 - optimizer.param_groups[0]["stat_decay"])
    assert state["3.weight"]["mean_activation"].dtype == torch.float32
    torch.testing.assert_close(abar, linear_mean(hidden, bias=True), rtol=1e-5, atol=1e-6)
    rows = layer_grad_rows(grads["3.weight"].double(), grads["3.bias"].double())
    expected = dense_decoupled(rows, abar, damping=1.0)
    lr = optimizer.param_groups[0]["lr"]
    update = layer_grad_rows(before["3.weight"] - model[3].weight.detach(), before["3.bias"] - model[3].bias.detach())
    torch.testing.assert_close(update.double() / lr, expected, rtol=1e-4, atol=1e-6)


def test_bfloat16_parameters_keep_float32_statistics():
    (x, y), = _batches(1)
    model = _model().to(torch.bfloat16)
    optimizer = macfn.optim.MAC(model)
    _train_step(model, optimizer, x.to(torch.bfloat16), y)

    state = optimizer.state_dict()["state"]
    assert state["0.weight"]["mean_activation"].dtype == torch.float32
    assert state["0.weight"]["momentum"].dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _checkpointed_run(resume_at: int | None, batches):
    """Train over ``batches``, optionally through a save and a load into fresh objects after ``resume_at`` steps."""
    model = _model()
    optimizer = macfn.optim.MAC(model, lr=0.1, weight_decay=1e-3, stats_interval=3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    trajectory = []
    for index, (x, y) in enumerate(batches):
        if index == resume_at:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict()}, buffer)
            buffer.seek(0)
            checkpoint = torch.load(buffer, weights_only=True)
            torch.manual_seed(123)  # the fresh model starts from other weights
            model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 5 * 5, 3), nn.LayerNorm(3))
            optimizer = macfn.optim.MAC(model, lr=0.1, weight_decay=1e-3, stats_interval=3)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        _train_step(model, optimizer, x, y)
        scheduler.step()
        trajectory.append((_params(model), copy.deepcopy(optimizer.state_dict()["state"])))
    return trajectory


@pytest.fixture(scope="module")
def uninterrupted_run():
    return _checkpointed_run(None, _batches(12))


@pytest.mark.parametrize("resume_at", [4, 6])
def test_checkpoint_resumes_bit_for_bit(resume_at, uninterrupted_run):
    # stats_interval=3 refreshes at steps 0, 3, 6 and 9: step 4 resumes between two refreshes,
    # step 6 right before one.
    batches = _batches(12)
    uninterrupted = uninterrupted_run
    resumed = _checkpointed_run(resume_at, batches)

    for step_index in range(resume_at, len(batches)):
        params, state = uninterrupted[step_index]
        resumed_params, resumed_state = resumed[step_index]
        for name in params:
            assert torch.equal(params[name], resumed_params[name]), (step_index, name)
            for key, value in state[name].items():
                assert torch.equal(value, resumed_state[name][key]), (step_index, name, key)


def test_load_from_other_model_names_parameters():
    optimizer = macfn.optim.MAC(_model())
    other = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    saved = macfn.optim.MAC(other).state_dict()
    before = copy.deepcopy(optimizer.state_dict())

    with pytest.raises(ValueError, match=r"missing parameters \['4.bias', '4.weight'\], unexpected parameters \[\]"):
        optimizer.load_state_dict(saved)
    assert str(before) == str(optimizer.state_dict())


def test_load_rejects_other_formats():
    model = _model()
    optimizer = macfn.optim.MAC(model)
    with pytest.raises(ValueError, match=r"expected the dict of macfn.optim.MAC.state_dict\(\)"):
        optimizer.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    saved = macfn.optim.MAC(_model(), stats_interval=5).state_dict()
    with pytest.raises(ValueError, match=r"stats_interval=5: this optimizer has stats_interval=1"):
        optimizer.load_state_dict(saved)
    saved = macfn.optim.MAC(_model(), momentum=0.0).state_dict()
    with pytest.raises(ValueError, match=r"Invalid state_dict entry '0.weight' with state"):
        optimizer.load_state_dict(saved)


def test_state_dict_is_keyed_by_names():
    model = _model()
    groups = [{"params": ["0.weight", "0.bias", "3.weight", "3.bias"]},
              {"params": ["4.weight", "4.bias"], "weight_decay": 0.0}]
    base = (macfn.BaseUpdate(("4.weight", "4.bias"), rule="adamw", lr_scale=0.01),)
    optimizer = macfn.optim.MAC(model, groups, base_updates=base)
    _train_step(model, optimizer, *_batches(1)[0])

    state_dict = optimizer.state_dict()
    assert set(state_dict) == {"state", "param_groups", "group_state", "stats_schedule"}
    assert state_dict["param_groups"][1]["params"] == ["4.weight", "4.bias"]
    assert set(state_dict["state"]["3.weight"]) == {"momentum", "mean_activation", "stat_count"}
    assert set(state_dict["state"]["4.weight"]) == {"exp_avg", "exp_avg_sq"}
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    fresh = macfn.optim.MAC(_model(), groups, base_updates=base)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.param_groups[0]["base_updates"] == base


def test_frozen_parameter_is_left_alone():
    model = _model()
    model[0].bias.requires_grad_(False)
    optimizer = macfn.optim.MAC(model)
    before = model[0].bias.detach().clone()
    for x, y in _batches(2):
        _train_step(model, optimizer, x, y)
    assert torch.equal(model[0].bias.detach(), before)
    assert not torch.equal(model[0].weight.detach(), _model()[0].weight.detach())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"damping": 0.0}, r"Invalid damping=0.0"),
        ({"dampnig": 1.0}, r"Invalid MAC hyperparameter 'dampnig'"),
        ({"stats_interval": 0}, r"Invalid stats_interval=0"),
        ({"sync_stats": True}, r"Invalid sync_stats=True: no process group"),
        ({"param_groups": [torch.zeros(3, requires_grad=True)]}, r"every parameter must belong to the model"),
        ({"param_groups": ["missing.weight"]}, r"Invalid parameter name 'missing.weight'"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        macfn.optim.MAC(_model(), **kwargs)


def test_split_layer_with_other_damping_raises():
    groups = [{"params": ["0.weight", "3.weight", "4.weight", "4.bias", "0.bias"]},
              {"params": ["3.bias"], "damping": 2.0}]
    with pytest.raises(ValueError, match=r"'3.weight' and '3.bias' share one preconditioner"):
        macfn.optim.MAC(_model(), groups)


# Traced code computes G abar as a broadcast product and a sum instead of bmm, so that inductor can
# fuse it; float32 rounding then differs from eager by about 1e-7 per step.
COMPILED_TOLERANCE = 1e-5


@pytest.mark.compile
def test_compiled_update_has_no_recompiles():
    batches = _batches(8)
    eager_model, compiled_model = _model(), _model()
    eager = macfn.optim.MAC(eager_model, stats_interval=2)
    counter = CompileCounter()
    compiled = macfn.optim.MAC(compiled_model, stats_interval=2, compile={"backend": counter})
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.9) for o in (eager, compiled)]

    for x, y in batches:
        for model, optimizer, scheduler in zip((eager_model, compiled_model), (eager, compiled), schedulers):
            _train_step(model, optimizer, x, y)
            scheduler.step()

    # One graph for statistics steps and one for the steps between; fullgraph=True rules out breaks.
    assert counter.frame_count == 2
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)


@pytest.mark.compile
def test_compiled_optimizer_step_traces_whole():
    batches = _batches(4)
    eager_model, compiled_model = _model(), _model()
    eager = macfn.optim.MAC(eager_model, lr=torch.tensor(0.1))
    compiled = macfn.optim.MAC(compiled_model, lr=torch.tensor(0.1))
    counter = CompileCounter()
    compiled_step = torch.compile(compiled.step, backend=counter, fullgraph=True)

    for x, y in batches:
        _train_step(eager_model, eager, x, y)
        compiled.zero_grad()
        F.cross_entropy(compiled_model(x), y).backward()
        compiled_step()
        for optimizer in (eager, compiled):
            optimizer.param_groups[0]["lr"].mul_(0.9)

    assert counter.frame_count == 1
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)


@pytest.mark.compile
def test_compiled_model_records_statistics():
    batches = _batches(4)
    eager_model, model = _model(), _model()
    counter = CompileCounter()
    compiled_model = torch.compile(model, backend=counter)
    eager = macfn.optim.MAC(eager_model, stats_interval=2)
    optimizer = macfn.optim.MAC(compiled_model, stats_interval=2)

    for x, y in batches:
        _train_step(eager_model, eager, x, y)
        _train_step(compiled_model, optimizer, x, y)

    assert set(optimizer.state_dict()["state"]) == {name for name, _ in eager_model.named_parameters()}
    assert counter.frame_count == 2  # recording and not recording
    for p, q in zip(eager_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.slow  # about 20 s of C++ compilation on 2 CPU cores
@pytest.mark.compile
def test_inductor_update_matches_eager():
    batches = _batches(3)
    eager_model, compiled_model = _model(), _model()
    eager = macfn.optim.MAC(eager_model)
    compiled = macfn.optim.MAC(compiled_model, compile=True)
    for x, y in batches:
        _train_step(eager_model, eager, x, y)
        _train_step(compiled_model, compiled, x, y)
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p, q, **FLOAT32_TOLERANCE)


def _second_moment_inverse(layer: nn.Module, inputs: list[torch.Tensor], damping: float) -> torch.Tensor:
    """Return ``(E[a a^T] + rho I)^-1`` as float64 ``[blocks, d, d]`` from explicit unfolded rows."""
    rows = []
    for x in inputs:
        x = x.double()
        if isinstance(layer, nn.Conv2d):
            patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
            rows.append(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
        else:
            rows.append(x.reshape(-1, x.shape[-1]))
    a = torch.cat(rows)
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=torch.float64)], dim=1)
    moment = a.T @ a / a.shape[0]
    return torch.linalg.solve(moment + damping * torch.eye(moment.shape[0], dtype=torch.float64),
                              torch.eye(moment.shape[0], dtype=torch.float64))[None]


@pytest.mark.parametrize("layer_index", [0, 1])
def test_exact_preconditioner_matches_dense_solve(layer_index):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 5 * 5, 4))
    layer = model[0] if layer_index == 0 else model[2]
    name = "0.weight" if layer_index == 0 else "2.weight"
    bias = "0.bias" if layer_index == 0 else "2.bias"
    loader = [(x, y) for x, y in _batches(3, size=4)]
    optimizer = macfn.optim.MAC(model, lr=1.0, momentum=0.0, weight_decay=0.0, damping=0.5)
    optimizer.freeze_exact_preconditioner(name, loader, max_batches=2)
    inputs = [x for x, _ in loader[:2]]
    if layer_index == 1:
        with torch.no_grad():
            inputs = [model[1](model[0](x)) for x in inputs]
    inverse = _second_moment_inverse(layer, inputs, damping=0.5)

    x, y = _batches(1)[0]
    before = _params(model)
    optimizer.zero_grad()
    F.cross_entropy(model(x[:, :, :, :]).reshape(8, 4)[:, :3], y).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    optimizer.step()

    expected = layer_grad_rows(grads[name], grads[bias]) @ inverse[0]
    update = layer_grad_rows(before[name] - layer.weight.detach(), before[bias] - layer.bias.detach())
    torch.testing.assert_close(update.double(), expected, rtol=1e-4, atol=1e-7)
    state = optimizer.state_dict()["state"][name]
    assert set(state) == {"exact_preconditioner"}
    assert model.training  # the estimate restored the training mode


def test_exact_preconditioner_survives_checkpoint():
    batches = _batches(4)
    model = _model()
    optimizer = macfn.optim.MAC(model)
    optimizer.freeze_exact_preconditioner("0.weight", batches[:2])
    _train_step(model, optimizer, *batches[0])
    checkpoint = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
    for x, y in batches[1:]:
        _train_step(model, optimizer, x, y)

    resumed = _model()
    resumed_optimizer = macfn.optim.MAC(resumed)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for x, y in batches[1:]:
        _train_step(resumed, resumed_optimizer, x, y)

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_exact_preconditioner_rejects_bad_input():
    optimizer = macfn.optim.MAC(_model())
    with pytest.raises(ValueError, match=r"Invalid weight_name='4.weight'"):
        optimizer.freeze_exact_preconditioner("4.weight", _batches(1))
    with pytest.raises(ValueError, match=r"Invalid damping=-1.0"):
        optimizer.freeze_exact_preconditioner("0.weight", _batches(1), damping=-1.0)
    with pytest.raises(ValueError, match=r"it gave no input rows"):
        optimizer.freeze_exact_preconditioner("0.weight", [])


def test_docs_examples_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "optim.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict[str, object] = {}
    exec(blocks[0], namespace)  # the training loop
    exec(blocks[1], namespace)  # parameter groups by name
    assert isinstance(namespace["optimizer"], macfn.optim.MAC)
