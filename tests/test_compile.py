"""A whole MAC training step under torch.compile(fullgraph=True): no graph breaks, no recompiles."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from torch import nn
from torch.func import functional_call

import macfn

pytestmark = pytest.mark.compile

# Inductor fuses and reorders float32 reductions; after 3 steps the drift observed is about 1e-6.
COMPILED_TOLERANCE = 1e-4


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    config = macfn.MACConfig(lr=0.1, damping=0.5)

    def loss_fn(params, x, y):
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    compute = macfn.grad_and_stats(model, loss_fn)

    def train_step(params, state, x, y, lr):
        grads, stats, loss = compute(params, x, y)
        params, state = macfn.step(params, grads, stats, state, config, lr=lr)
        return params, state, loss

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 1, 8, 8, generator=generator), torch.randint(0, 3, (8,), generator=generator))
               for _ in range(4)]
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = macfn.init(params, config, compute(params, *batches[0])[1])
    return train_step, params, state, batches


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_train_step_has_no_graph_breaks():
    train_step, params, state, batches = _setup()
    explanation = torch._dynamo.explain(train_step)(params, state, *batches[0], torch.tensor(0.1))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_equals_eager_without_recompiles():
    train_step, params, state, batches = _setup()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, fullgraph=True, backend=counter)

    eager_params, eager_state = params, state
    compiled_params, compiled_state = params, state
    for step_index in range(20):
        x, y = batches[step_index % len(batches)]
        lr = torch.tensor(0.1 / (1 + step_index))  # changes every step
        compiled_params, compiled_state, compiled_loss = compiled(compiled_params, compiled_state, x, y, lr)
        if step_index < 3:
            eager_params, eager_state, eager_loss = train_step(eager_params, eager_state, x, y, lr)
            torch.testing.assert_close(compiled_loss, eager_loss, rtol=COMPILED_TOLERANCE, atol=COMPILED_TOLERANCE)
            for name in params:
                torch.testing.assert_close(compiled_params[name], eager_params[name], rtol=COMPILED_TOLERANCE,
                                           atol=COMPILED_TOLERANCE)
            for name, mean in eager_state["mean_activation"].items():
                torch.testing.assert_close(compiled_state["mean_activation"][name], mean, rtol=COMPILED_TOLERANCE,
                                           atol=COMPILED_TOLERANCE)

    assert counter.frame_count == 1, f"compiled {counter.frame_count} times in 20 steps"
    assert compiled_state["step"].item() == 20


def test_step_without_stats_compiles_once():
    _, params, state, _ = _setup()
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")

    def step_without_stats(params, state, grads, lr):
        return macfn.step(params, grads, None, state, lr=lr)

    compiled = torch.compile(step_without_stats, fullgraph=True, backend=counter)
    grads = {name: torch.ones_like(p) for name, p in params.items()}
    for index in range(5):
        params, state = compiled(params, state, grads, torch.tensor(0.01 * (index + 1)))
    assert counter.frame_count == 1
