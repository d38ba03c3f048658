"""The MAC step against float64 dense references: Linear and Conv2d layouts, both damping forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import macfn
from tests import _reference as ref

# float64 end to end; the only differences are summation order in the mean and the matvec.
FLOAT64_TOLERANCE = 1e-10


def _first_step(model: nn.Module, x: torch.Tensor, config: macfn.MACConfig):
    """Run capture and one MAC step; return params before/after, autograd grads and macfn stats."""
    model = model.double()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}

    def loss_fn(p, inputs):
        return functional_call(model, p, (inputs,)).square().sum()

    compute = macfn.grad_and_stats(model, loss_fn)
    grads, stats, _ = compute(params, x)
    new_params, _ = macfn.step(params, grads, stats, None, config)
    compute.remove()
    return params, new_params, grads, stats


def _check_layer(params, new_params, grads, weight_name, bias_name, abar, config):
    grad_rows = ref.layer_grad_rows(grads[weight_name], grads.get(bias_name) if bias_name else None)
    if config.damping_form == "exact":
        expected_rows = ref.dense_exact(grad_rows, abar, config.damping)
    else:
        expected_rows = ref.dense_decoupled(grad_rows, abar, config.damping)
    weight_shape = params[weight_name].shape
    expected_weight = params[weight_name] - config.lr * expected_rows[:, : weight_shape[1:].numel()].reshape(weight_shape)
    torch.testing.assert_close(new_params[weight_name], expected_weight, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    if bias_name:
        expected_bias = params[bias_name] - config.lr * expected_rows[:, -1]
        torch.testing.assert_close(new_params[bias_name], expected_bias, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


@pytest.mark.parametrize("damping_form", ["decoupled", "exact"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_shape", [(7, 5), (2, 3, 4, 5)])
def test_linear_step_matches_dense(damping_form, bias, input_shape):
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias)
    x = torch.randn(*input_shape, dtype=torch.float64) + 0.5
    config = macfn.MACConfig(lr=0.3, momentum=0.0, weight_decay=0.0, damping=0.7, damping_form=damping_form)

    params, new_params, grads, stats = _first_step(layer, x, config)

    abar = ref.linear_mean(x, bias)
    torch.testing.assert_close(stats["weight"], abar, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    _check_layer(params, new_params, grads, "weight", "bias" if bias else None, abar, config)


CONV_CASES = [
    dict(in_channels=3, out_channels=4, kernel_size=3),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=2, out_channels=4, kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, groups=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4, bias=False),
    dict(in_channels=3, out_channels=2, kernel_size=4, padding="same", dilation=1),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=1, padding_mode="replicate"),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding=2, stride=2, padding_mode="circular"),
    dict(in_channels=3, out_channels=5, kernel_size=1),
    dict(in_channels=3, out_channels=2, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("damping_form", ["decoupled", "exact"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_step_matches_dense(case, damping_form):
    torch.manual_seed(1)
    layer = nn.Conv2d(**case)
    x = torch.randn(3, case["in_channels"], 9, 8, dtype=torch.float64) + 0.3
    config = macfn.MACConfig(lr=0.2, momentum=0.0, weight_decay=0.0, damping=0.5, damping_form=damping_form)

    params, new_params, grads, stats = _first_step(layer, x, config)

    abar = ref.conv2d_mean(layer, x)
    torch.testing.assert_close(stats["weight"], abar, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)
    _check_layer(params, new_params, grads, "weight", "bias" if layer.bias is not None else None, abar, config)


def test_conv2d_channels_last_input_matches():
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    recorder = macfn.StatsRecorder(layer)
    recorder.start()
    layer(x.to(memory_format=torch.channels_last))
    stats = recorder.stop()
    torch.testing.assert_close(stats["weight"], ref.conv2d_mean(layer, x), rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_shared_layer_averages_all_calls():
    torch.manual_seed(3)
    shared = nn.Linear(4, 4).double()

    class TwoCalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(x)))

    model = TwoCalls()
    x = torch.randn(6, 4, dtype=torch.float64)
    recorder = macfn.StatsRecorder(model)
    recorder.start()
    hidden = torch.tanh(model.shared(x))
    model.shared(hidden)
    stats = recorder.stop()
    expected = ref.linear_mean(torch.cat([x, hidden.detach()]), bias=True)
    torch.testing.assert_close(stats["shared.weight"], expected, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def test_tied_weights_across_modules():
    torch.manual_seed(4)
    first = nn.Linear(3, 3)
    second = nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).double()
    layers, _ = macfn.find_layers(model)
    assert list(layers) == ["0.weight"]
    # The two modules have their own biases, so the biases take the base update.
    assert layers["0.weight"].bias is None

    x = torch.randn(5, 3, dtype=torch.float64)
    recorder = macfn.StatsRecorder(model)
    recorder.start()
    hidden = torch.tanh(first(x))
    second(hidden)
    stats = recorder.stop()
    torch.testing.assert_close(stats["0.weight"], ref.linear_mean(torch.cat([x, hidden.detach()]), bias=False))


def test_wide_layer_forms_no_square_matrix():
    # A d_in x d_in float32 matrix for d_in = 300_000 would need 360 GB.
    layer = nn.Linear(300_000, 2)
    x = torch.randn(4, 300_000)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    compute = macfn.grad_and_stats(layer, lambda p, inputs: functional_call(layer, p, (inputs,)).sum())
    grads, stats, _ = compute(params, x)
    new_params, _ = macfn.step(params, grads, stats, None, macfn.MACConfig())
    assert new_params["weight"].shape == (2, 300_000)
    assert torch.isfinite(new_params["weight"]).all()
