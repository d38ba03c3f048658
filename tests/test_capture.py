"""Statistics capture: active only inside grad_and_stats, untouched forward passes elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import macfn


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_other_forward_passes_untouched():
    model = _model()
    x = torch.randn(5, 4)
    before = model(x)
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    params = {name: p.detach() for name, p in model.named_parameters()}
    compute(params, x)

    assert torch.equal(model(x), before)
    assert not compute.recorder.recording
    # A plain forward pass between two captures adds nothing to the next capture.
    model(torch.full((5, 4), 100.0))
    _, stats, _ = compute(params, x)
    torch.testing.assert_close(stats["0.weight"][0, :4], x.mean(0))


def test_stats_keys_and_shapes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), nn.Conv2d(4, 4, 3, groups=2, bias=False), nn.Flatten(),
                          nn.Linear(4, 2))
    params = {name: p.detach() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    _, stats, _ = compute(params, torch.randn(2, 3, 5, 5))
    assert {name: tuple(mean.shape) for name, mean in stats.items()} == {
        "0.weight": (1, 3 * 9 + 1),
        "1.weight": (2, 2 * 9),
        "3.weight": (1, 4 + 1),
    }
    assert all(mean.dtype == torch.float32 for mean in stats.values())
    assert torch.equal(stats["0.weight"][:, -1], torch.ones(1))


def test_unused_layer_keeps_running_average():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.unused = nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    params = {name: p.detach() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    grads, stats, _ = compute(params, torch.randn(4, 3))
    assert set(stats) == {"used.weight"}
    _, state = macfn.step(params, grads, stats)
    assert set(state["mean_activation"]) == {"used.weight"}


def test_has_aux_returns_aux_last():
    model = _model()
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_fn(p, inputs):
        logits = functional_call(model, p, (inputs,))
        return logits.sum(), logits.detach()

    grads, stats, loss, logits = macfn.grad_and_stats(model, loss_fn, has_aux=True)(params, torch.randn(5, 4))
    assert logits.shape == (5, 3)
    assert torch.allclose(loss, logits.sum())


def test_non_scalar_loss_rejected():
    model = _model()
    params = {name: p.detach() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)))
    with pytest.raises(ValueError, match="expected a scalar loss tensor"):
        compute(params, torch.randn(5, 4))
    assert not compute.recorder.recording


def test_remove_detaches_hooks():
    model = _model()
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
    compute.remove()
    assert all(len(m._forward_hooks) == 0 for m in model if isinstance(m, nn.Linear))


def test_recorder_training_only_skips_eval():
    model = _model()
    recorder = macfn.StatsRecorder(model, training_only=True)
    recorder.start()
    model.eval()
    model(torch.randn(2, 4))
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert recorder.stop() == {}


def test_batchnorm_training_mode_error_explains_fix():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    params = {name: p.detach() for name, p in model.named_parameters()}
    compute = macfn.grad_and_stats(model, lambda p, inputs: functional_call(model, p, (inputs,)).sum())
    with pytest.raises(RuntimeError, match=r"replace_all_batch_norm_modules_"):
        compute(params, torch.randn(5, 3))
    assert not compute.recorder.recording

    torch.func.replace_all_batch_norm_modules_(model)
    grads, stats, _ = compute(params, torch.randn(5, 3))
    assert set(stats) == {"0.weight", "2.weight"}
