"""Random small networks trained with macfn.step, macfn.optim.MAC and a dense float64 MAC agree step by step.

The image architectures are stacks of Conv2d and Linear layers with random sizes, strides,
padding, dilation, groups, padding modes, bias flags and activations. The sequence
architectures put an nn.MultiheadAttention self-attention block (random heads, bias, causal
mask and residual connection) between two Linear layers. The profile chosen by
HYPOTHESIS_PROFILE (tests/conftest.py) bounds the number of examples: "ci" stays within
seconds, "nightly" runs many more. Every failure found becomes a pinned @example.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import macfn
import macfn.optim
from tests._dense_mac import DenseMAC

# float64 throughout; the implementations differ in summation order only. Observed: about 1e-15.
FLOAT64_TOLERANCE = 1e-10
STEPS = 3
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}


@st.composite
def conv_layer(draw: Any, channels: int, size: int) -> tuple[dict[str, Any], int, int]:
    """Draw one Conv2d that fits a ``[channels, size, size]`` input; return it, its channels and size."""
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
    out_channels = groups * draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    largest_kernel = (size + 2 * padding - 1) // dilation + 1
    kernel = draw(st.integers(1, min(3, largest_kernel)))
    stride = draw(st.integers(1, 2))
    padding_mode = draw(st.sampled_from(["zeros", "replicate", "circular"])) if 0 < padding <= size else "zeros"
    layer = dict(kind="conv", out=out_channels, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, padding_mode=padding_mode, bias=draw(st.booleans()),
                 activation=draw(st.sampled_from(sorted(ACTIVATIONS))))
    out_size = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    return layer, out_channels, out_size


@st.composite
def hyperparameters(draw: Any) -> dict[str, float]:
    """Draw MAC hyperparameters over the ranges people use, with damping over four decades."""
    return dict(
        lr=draw(st.sampled_from([0.01, 0.1, 0.5])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3])),
        damping=draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0])),
        stat_decay=draw(st.sampled_from([0.0, 0.5, 0.95])),
    )


@st.composite
def image_architectures(draw: Any) -> dict[str, Any]:
    """Draw an image input shape, a Conv2d stack, a Linear stack, hyperparameters and a seed."""
    batch = draw(st.integers(1, 4))
    in_channels = draw(st.integers(1, 4))
    in_size = draw(st.integers(1, 6))
    channels, size = in_channels, in_size
    layers = []
    for _ in range(draw(st.integers(0, 2))):
        layer, channels, size = draw(conv_layer(channels, size))
        layers.append(layer)
    for _ in range(draw(st.integers(1, 2))):
        layers.append(dict(kind="linear", out=draw(st.integers(1, 5)), bias=draw(st.booleans()),
                           activation=draw(st.sampled_from(sorted(ACTIVATIONS)))))
    return dict(kind="image", input_shape=(batch, in_channels, in_size, in_size), layers=layers,
                config=draw(hyperparameters()), seed=draw(st.integers(0, 2**16)))


@st.composite
def sequence_architectures(draw: Any) -> dict[str, Any]:
    """Draw ``[batch, tokens, features]`` input, Linear layers around one self-attention block, and the rest."""
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 2))
    width = heads * draw(st.integers(1, 3))
    activations = st.sampled_from(sorted(ACTIVATIONS))
    layers = [
        dict(kind="linear", out=width, bias=draw(st.booleans()), activation=draw(activations)),
        dict(kind="attention", heads=heads, bias=draw(st.booleans()), causal=draw(st.booleans()),
             residual=draw(st.booleans()), activation="identity"),
        dict(kind="linear", out=draw(st.integers(1, 4)), bias=draw(st.booleans()), activation=draw(activations)),
    ]
    return dict(kind="sequence", input_shape=(batch, tokens, draw(st.integers(1, 4))), layers=layers,
                config=draw(hyperparameters()), seed=draw(st.integers(0, 2**16)))


class SelfAttention(nn.Module):
    """nn.MultiheadAttention over ``[batch, tokens, width]``, optionally causal and residual."""

    def __init__(self, width: int, heads: int, bias: bool, causal: bool, residual: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, bias=bias, batch_first=True)
        self.causal = causal
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.shape[1]
        mask = ~torch.ones(tokens, tokens, dtype=torch.bool).tril() if self.causal else None  # True = blocked
        output = self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        return x + output if self.residual else output


def build(spec: dict[str, Any]) -> nn.Sequential:
    """Build the float64 network that ``spec`` describes."""
    torch.manual_seed(spec["seed"])
    sequence = spec["kind"] == "sequence"
    channels = spec["input_shape"][-1] if sequence else spec["input_shape"][1]
    size = spec["input_shape"][2]
    modules: list[nn.Module] = []
    flat = sequence
    for layer in spec["layers"]:
        if layer["kind"] == "attention":
            modules.append(SelfAttention(channels, layer["heads"], layer["bias"], layer["causal"], layer["residual"]))
        elif layer["kind"] == "conv":
            conv = nn.Conv2d(channels, layer["out"], layer["kernel"], stride=layer["stride"], padding=layer["padding"],
                             dilation=layer["dilation"], groups=layer["groups"], bias=layer["bias"],
                             padding_mode=layer["padding_mode"])
            modules.append(conv)
            channels = layer["out"]
            size = (size + 2 * layer["padding"] - layer["dilation"] * (layer["kernel"] - 1) - 1) // layer["stride"] + 1
        else:
            if not flat:
                modules.append(nn.Flatten())
                channels, flat = channels * size * size, True
            modules.append(nn.Linear(channels, layer["out"], bias=layer["bias"]))
            channels = layer["out"]
        modules.append(ACTIVATIONS[layer["activation"]]())
    return nn.Sequential(*modules).double()


def batches(spec: dict[str, Any], model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Return one (input, target) pair per step; inputs have a non-zero mean so abar matters."""
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    pairs = []
    for _ in range(STEPS):
        x = torch.randn(*spec["input_shape"], generator=generator, dtype=torch.float64) + 0.5
        with torch.no_grad():
            output_shape = model(x).shape
        pairs.append((x, torch.randn(output_shape, generator=generator, dtype=torch.float64)))
    return pairs


def _loss(output: Tensor, target: Tensor) -> Tensor:
    return (output - target).square().mean()


SMALLEST = dict(kind="image", input_shape=(1, 1, 1, 1), layers=[dict(kind="linear", out=1, bias=False, activation="identity")],
                config=dict(lr=0.1, momentum=0.0, weight_decay=0.0, damping=1e-3, stat_decay=0.0), seed=0)
GROUPED_CIRCULAR = dict(
    kind="image",
    input_shape=(2, 4, 5, 5),
    layers=[dict(kind="conv", out=4, kernel=3, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular",
                 bias=True, activation="gelu"),
            dict(kind="conv", out=3, kernel=1, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
                 bias=False, activation="relu"),
            dict(kind="linear", out=2, bias=True, activation="tanh")],
    config=dict(lr=0.5, momentum=0.9, weight_decay=1e-3, damping=0.1, stat_decay=0.95), seed=3)


CAUSAL_ATTENTION = dict(
    kind="sequence",
    input_shape=(2, 4, 3),
    layers=[dict(kind="linear", out=4, bias=True, activation="gelu"),
            dict(kind="attention", heads=2, bias=True, causal=True, residual=True, activation="identity"),
            dict(kind="linear", out=2, bias=False, activation="identity")],
    config=dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1.0, stat_decay=0.95), seed=5)


@given(spec=st.one_of(image_architectures(), sequence_architectures()))
@example(spec=SMALLEST)
@example(spec=GROUPED_CIRCULAR)
@example(spec=CAUSAL_ATTENTION)
def test_step_optim_and_dense_agree(spec):
    model = build(spec)
    data = batches(spec, model)
    config = macfn.MACConfig(**spec["config"])

    dense = DenseMAC(model, **spec["config"])

    functional_model = copy.deepcopy(model)
    compute = macfn.grad_and_stats(functional_model, lambda p, x, y: _loss(functional_call(functional_model, p, (x,)), y))
    params = {name: p.detach().clone() for name, p in functional_model.named_parameters()}
    state = None

    adapter_model = copy.deepcopy(model)
    optimizer = macfn.optim.MAC(adapter_model, **spec["config"])

    for index, (x, y) in enumerate(data):
        expected = dense.step(lambda m: _loss(m(x), y))

        grads, stats, _ = compute(params, x, y)
        params, state = macfn.step(params, grads, stats, state, config)

        optimizer.zero_grad()
        _loss(adapter_model(x), y).backward()
        optimizer.step()

        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE,
                                       msg=lambda m: f"macfn.step, step {index}, {name}: {m}")
            torch.testing.assert_close(adapter_model.get_parameter(name).detach(), value, rtol=FLOAT64_TOLERANCE,
                                       atol=FLOAT64_TOLERANCE, msg=lambda m: f"macfn.optim.MAC, step {index}, {name}: {m}")

