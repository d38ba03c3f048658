"""Models and fixed synthetic batches that the benchmarks time.

Every workload is one model, one batch and the MAC hyperparameters the authors use for
that kind of model (Seung, Lee and Ko, 2025, arXiv 2506.08464): damping 1.0 and
stat_decay 0.95 for MLPs and CNNs, damping 3.0 and stat_decay 0.99 for transformers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import macfn

MLP_WIDTHS = (256, 512, 1024, 2048, 4096)
MLP_BATCH = 128
IMAGE_BATCH = 32
TEXT_BATCH = 32
CONTEXT = 64
VOCAB = 96


def mlp(width: int, in_features: int = 784, classes: int = 10) -> nn.Sequential:
    """Build the MLP ``in_features-width-width-classes`` with ReLU activations."""
    return nn.Sequential(
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, classes),
    )


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convolutions, with a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        # NOTE: batch normalisation without running statistics, because macfn.grad_and_stats
        # runs the forward pass inside torch.func.grad, which rejects the in-place update of
        # a running-statistics buffer. The arithmetic of a training step is the same.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels, track_running_stats=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, track_running_stats=False),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, H / stride, W / stride]``."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet_cnn(classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), in_channels: int = 3) -> nn.Sequential:
    """Build a small ResNet for 32x32 images: a 3x3 stem, three residual stages, a linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0], track_running_stats=False),
        nn.ReLU(),
        BasicBlock(widths[0], widths[0], 1),
        BasicBlock(widths[0], widths[1], 2),
        BasicBlock(widths[1], widths[2], 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[2], classes),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` nn.Linear and an output nn.Linear."""

    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map tokens ``[N, T, dim]`` to ``[N, T, dim]``."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        projected: Tensor = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return projected


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, hidden: int, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map tokens ``[N, T, dim]`` to ``[N, T, dim]``."""
        x = x + self.attn(self.norm1(x))
        out: Tensor = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return out


class ViT(nn.Module):
    """Small vision transformer: 4x4 patch convolution, transformer blocks, mean-pooled head."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, 2 * dim, causal=False) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map images ``[N, C, H, W]`` to logits ``[N, classes]``."""
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        logits: Tensor = self.head(self.norm(self.blocks(tokens)).mean(dim=1))
        return logits


class GPT(nn.Module):
    """Small decoder-only transformer over characters, without weight tying."""

    def __init__(self, vocab: int = VOCAB, context: int = CONTEXT, dim: int = 128, depth: int = 4,
                 heads: int = 4) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, context, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, 4 * dim, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        """Map token ids ``[N, T]`` to next-token logits ``[N, T, vocab]``."""
        x = self.token_embed(idx) + self.pos_embed[:, : idx.shape[1]]
        logits: Tensor = self.head(self.norm(self.blocks(x)))
        return logits


def cross_entropy(output: Tensor, targets: Tensor) -> Tensor:
    """Return the mean cross-entropy of logits ``[..., classes]`` against ids ``[...]``."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


@dataclasses.dataclass
class Workload:
    """One model with a fixed batch and the MAC hyperparameters for it.

    Attributes:
        name: Workload name, e.g. ``"mlp-2048"``.
        model: The module; every optimizer variant trains its own deep copy.
        inputs: The batch, ``[N, ...]``.
        targets: Class ids, ``[N]`` or ``[N, T]`` for next-token prediction.
        config: MAC hyperparameters; SGD uses the same lr, momentum and weight decay.
        classes: Number of classes (the vocabulary for the GPT).
    """

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    config: macfn.MACConfig
    classes: int


CNN_CONFIG = macfn.MACConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, damping=1.0, stat_decay=0.95)
TRANSFORMER_CONFIG = macfn.MACConfig(lr=0.1, momentum=0.9, weight_decay=1e-4, damping=3.0, stat_decay=0.99)


def workload_names() -> list[str]:
    """Return the names that :func:`build_workload` accepts, in report order."""
    return [f"mlp-{width}" for width in MLP_WIDTHS] + ["cnn", "vit", "gpt"]


def build_workload(name: str, *, device: str | torch.device = "cpu", seed: int = 0, tiny: bool = False) -> Workload:
    """Build a workload by name with a fixed random batch.

    Args:
        name: ``"mlp-<width>"``, ``"cnn"``, ``"vit"`` or ``"gpt"``.
        device: Where the model and batch live.
        seed: Seed of the weights and the batch.
        tiny: Build a minimal version (small widths and batch) for smoke tests.

    Returns:
        The :class:`Workload`.

    Raises:
        ValueError: Unknown ``name``.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model: nn.Module
    if name.startswith("mlp-"):
        width = int(name.removeprefix("mlp-"))
        batch = 8 if tiny else MLP_BATCH
        model, classes, config = mlp(width), 10, CNN_CONFIG
        inputs = torch.randn(batch, 784, generator=generator)
    elif name == "cnn":
        batch = 4 if tiny else IMAGE_BATCH
        model = resnet_cnn(widths=(8, 8, 8) if tiny else (32, 64, 128))
        classes, config = 10, CNN_CONFIG
        inputs = torch.randn(batch, 3, 32, 32, generator=generator)
    elif name == "vit":
        batch = 4 if tiny else IMAGE_BATCH
        model = ViT(dim=16, depth=1, heads=2) if tiny else ViT()
        classes, config = 10, TRANSFORMER_CONFIG
        inputs = torch.randn(batch, 3, 32, 32, generator=generator)
    elif name == "gpt":
        batch = 4 if tiny else TEXT_BATCH
        model = GPT(dim=16, depth=1, heads=2) if tiny else GPT()
        classes, config = VOCAB, TRANSFORMER_CONFIG
        inputs = torch.randint(0, VOCAB, (batch, CONTEXT), generator=generator)
    else:
        raise ValueError(f"Unknown workload {name!r}: expected one of {', '.join(workload_names())}.")
    if name == "gpt":
        targets = torch.randint(0, classes, (batch, CONTEXT), generator=generator)
    else:
        targets = torch.randint(0, classes, (batch,), generator=generator)
    return Workload(name, model.to(device), inputs.to(device), targets.to(device), config, classes)
