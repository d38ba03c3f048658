"""The text task: a character-level GPT-style language model trained with MAC, AdamW and SGD.

The text is the documentation topics that ship with CPython in the standard library's
``pydoc_data`` package (``from pydoc_data.topics import topics``; no download), joined in key
order: about 465,000 characters of English with code. The first 90% of the characters train
and the last 10% validate. Every run starts from the same initial weights and trains on the
same windows in the same order, so only the optimizer differs.

The four runs take the same number of steps. MAC gives the value rows of each fused qkv layer
the attention-weighted mean activation. MAC-noattn turns that weighting off, so the value rows
take the ordinary mean (an ablation). AdamW and SGD with momentum are the torch.optim
optimizers. One
epoch of this task is :data:`STEPS_PER_EPOCH` optimizer steps followed by an evaluation of the
validation loss, because a full pass over the text would take longer than the whole demo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import macfn

from ._options import DemoOptions
from ._report import (
    Column,
    HistoryPoint,
    ProgressBar,
    RunRecord,
    Stopwatch,
    TaskReport,
    progress_bar,
    run_environment,
)
from ._trainers import AdamWSettings, MACTrainer, SGDSettings, Trainer, adamw_trainer, sgd_trainer

MODEL_NAME = "char-GPT"
OPTIMIZERS = ("MAC", "MAC-noattn", "AdamW", "SGD")
"""Display names: MAC, MAC without attention weighting, torch.optim.AdamW, torch.optim.SGD."""

CONTEXT = 64
"""Characters per training window; the model predicts each next character."""
BATCH_SIZE = 16
WIDTH = 64
HEADS = 4
LAYERS = 2
STEPS_PER_EPOCH = 25
VALIDATION_WINDOWS = 64
"""Fixed validation windows (64 x 64 = 4,096 characters) evaluated after every epoch."""
VALIDATION_FRACTION = 0.1
WARM_UP_STEPS = 3

MAC_CONFIG = macfn.MACConfig(lr=0.3, momentum=0.9, weight_decay=0.0, damping=1.0, stat_decay=0.95)
"""MAC with momentum SGD as the base update of every parameter, as in the paper.

The learning rate is the best of {0.1, 0.3, 0.5} at the default 200 steps on a tuning split
taken from the end of the training text (docs/results.md, section Text)."""


SGD_SETTINGS = SGDSettings(lr=0.1, momentum=0.9, weight_decay=0.0)
"""``torch.optim.SGD`` with MAC's momentum; the learning rate is the best of {0.1, 0.3, 0.5} on the
tuning split (0.5 diverged)."""
ADAMW_SETTINGS = AdamWSettings(lr=3e-3, weight_decay=1e-2)
"""``torch.optim.AdamW``; the learning rate is the best of {1e-3, 3e-3, 1e-2} on the tuning split."""

COLUMNS = (
    Column("train_loss", "train loss", ".4f"),
    Column("validation_loss", "val loss", ".4f"),
    Column("tokens_per_s", "tokens/s", ".0f"),
    Column("wall_time_s", "wall time (s)", ".2f"),
)


@dataclasses.dataclass(frozen=True)
class TextData:
    """The encoded text on one device.

    Attributes:
        vocabulary: The distinct characters in sorted order; a token is an index into it.
        train: Training tokens ``[n_train]`` int64.
        validation: Validation tokens ``[n_validation]`` int64, the characters after the training part.
    """

    vocabulary: str
    train: Tensor
    validation: Tensor


def load_text() -> str:
    """Return the pydoc topics of this Python installation joined in key order."""
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


def load_data(device: torch.device, *, tuning: bool = False) -> TextData:
    """Encode the text as characters and split it into training and validation tokens.

    Args:
        device: Device of the returned tensors.
        tuning: Split the training part once more in the same proportion and return its two
            parts, so that hyperparameters can be chosen without the validation part.
    """
    text = load_text()
    vocabulary = "".join(sorted(set(text)))
    index = {character: position for position, character in enumerate(vocabulary)}
    tokens = torch.tensor([index[character] for character in text], dtype=torch.int64)
    cut = int(len(tokens) * (1.0 - VALIDATION_FRACTION))
    train, validation = tokens[:cut], tokens[cut:]
    if tuning:
        cut = int(len(train) * (1.0 - VALIDATION_FRACTION))
        train, validation = train[:cut], train[cut:]
    return TextData(vocabulary, train.to(device), validation.to(device))


def windows(tokens: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    """Cut inputs ``[n, CONTEXT]`` and next-character targets ``[n, CONTEXT]`` at ``starts`` ``[n]``."""
    offsets = torch.arange(CONTEXT + 1, device=tokens.device)
    chunk = tokens[starts.to(tokens.device)[:, None] + offsets[None, :]]
    return chunk[:, :-1], chunk[:, 1:]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv layer and F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q, k, v = (t.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.proj(y.transpose(1, 2).reshape(batch, tokens, width))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x GELU MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        out: Tensor = x + self.mlp(self.ln2(x))
        return out


class CharGPT(nn.Module):
    """Token and learned position embeddings, pre-norm blocks, and an LM head tied to the token embedding.

    Maps tokens ``[batch, tokens]`` to next-character logits ``[batch, tokens, vocabulary]``.
    """

    def __init__(self, vocabulary: int, *, width: int = WIDTH, heads: int = HEADS, layers: int = LAYERS) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocabulary, width)
        self.pos = nn.Parameter(torch.randn(CONTEXT, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.tok.weight
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits: Tensor = self.head(self.ln(x))
        return logits

    def attention(self) -> list[macfn.AttentionDeclaration]:
        """Declare every block's attention for macfn's statistics capture."""
        return [
            macfn.declare_attention(block.attn, qkv=block.attn.qkv, heads=block.attn.heads, causal=True)
            for block in self.blocks
            if isinstance(block, Block)
        ]


def _language_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _make_trainer(optimizer: str, model: CharGPT, lr: float | None) -> Trainer:
    if optimizer in ("MAC", "MAC-noattn"):
        config = MAC_CONFIG if lr is None else MAC_CONFIG.replace(lr=lr)
        weighting = optimizer == "MAC"
        note = "attention-weighted value mean" if weighting else "ordinary value mean"
        return MACTrainer(model, config, _language_loss, notes=[note], attention=model.attention(),
                          attention_weighting=weighting)
    if optimizer == "SGD":
        return sgd_trainer(model, SGD_SETTINGS, _language_loss, lr)
    if optimizer == "AdamW":
        return adamw_trainer(model, ADAMW_SETTINGS, _language_loss, lr)
    raise ValueError(f"Invalid optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}.")


@torch.no_grad()
def evaluate(model: nn.Module, params: dict[str, Tensor], batches: list[tuple[Tensor, Tensor]]) -> float:
    """Return the mean next-character cross-entropy (nats) of ``params`` over ``batches``."""
    total = 0.0
    for x, y in batches:
        total += _language_loss(functional_call(model, params, (x,)), y).item()
    return total / len(batches)


def validation_batches(data: TextData) -> list[tuple[Tensor, Tensor]]:
    """Return :data:`VALIDATION_WINDOWS` windows spread evenly over the validation text, in batches."""
    last_start = data.validation.shape[0] - CONTEXT - 1
    starts = torch.linspace(0, last_start, VALIDATION_WINDOWS).to(torch.int64)
    return [windows(data.validation, chunk) for chunk in torch.split(starts, BATCH_SIZE)]


def warm_up(optimizer: str, data: TextData, steps: int = WARM_UP_STEPS) -> None:
    """Take a few untimed steps on a throwaway model, so that one-time set-up costs are not timed.

    The global random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        model = CharGPT(len(data.vocabulary)).to(data.train.device)
        trainer = _make_trainer(optimizer, model, None)
        starts = torch.arange(BATCH_SIZE) * CONTEXT
        for _ in range(steps):
            trainer.train_step(*windows(data.train, starts))


def train_run(
    optimizer: str,
    data: TextData,
    *,
    epochs: int,
    seed: int,
    lr: float | None = None,
    on_epoch: Callable[[], object] | None = None,
) -> RunRecord:
    """Train one model with one optimizer for ``epochs * STEPS_PER_EPOCH`` steps and measure it.

    The initial weights and the training windows depend only on ``seed``. The clock runs only
    during the training steps; after every epoch, outside the clock, the validation loss is
    evaluated on fixed windows.

    Args:
        optimizer: One of :data:`OPTIMIZERS`.
        data: Training and validation tokens.
        epochs: Epochs of :data:`STEPS_PER_EPOCH` steps, >= 1.
        seed: Seed of the initial weights and the training windows.
        lr: Learning rate in place of the optimizer's setting in this module, e.g. for a sweep.
        on_epoch: Called with no arguments after every epoch, e.g. to advance a progress bar.

    Returns:
        A record with the validation-loss history (``epochs + 1`` points from time 0) and the
        metrics ``train_loss`` (mean batch loss of the last epoch), ``validation_loss``,
        ``tokens_per_s`` and ``wall_time_s``.
    """
    torch.manual_seed(seed)
    device = data.train.device
    model = CharGPT(len(data.vocabulary)).to(device)
    trainer = _make_trainer(optimizer, model, lr)
    order = torch.Generator().manual_seed(seed)
    steps_total = epochs * STEPS_PER_EPOCH
    starts = torch.randint(0, data.train.shape[0] - CONTEXT - 1, (steps_total, BATCH_SIZE), generator=order)
    held_out = validation_batches(data)
    stopwatch = Stopwatch(device)

    history = [HistoryPoint(0.0, 0, evaluate(model, trainer.parameters(), held_out))]
    epoch_losses: list[Tensor] = []
    for epoch in range(epochs):
        epoch_losses = []
        with stopwatch:
            for step in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH):
                epoch_losses.append(trainer.train_step(*windows(data.train, starts[step])))
        history.append(HistoryPoint(stopwatch.elapsed, (epoch + 1) * STEPS_PER_EPOCH,
                                    evaluate(model, trainer.parameters(), held_out)))
        if on_epoch is not None:
            on_epoch()

    tokens = steps_total * BATCH_SIZE * CONTEXT
    metrics = {
        "train_loss": float(torch.stack(epoch_losses).mean()),
        "validation_loss": history[-1].loss,
        "tokens_per_s": tokens / stopwatch.elapsed if stopwatch.elapsed > 0 else float("inf"),
        "wall_time_s": stopwatch.elapsed,
    }
    return RunRecord(optimizer, MODEL_NAME, history, metrics, trainer.settings)


def run(options: DemoOptions) -> TaskReport:
    """Train the language model with every optimizer and collect the report.

    Args:
        options: Checked demo options; ``options.epochs`` counts epochs of :data:`STEPS_PER_EPOCH` steps.

    Returns:
        Four runs (MAC, MAC without attention weighting, AdamW, SGD) with the table columns and metadata.
    """
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = load_data(options.device)
    bar: ProgressBar = progress_bar(len(OPTIMIZERS) * options.epochs, "text", quiet=options.quiet)
    runs: list[RunRecord] = []
    try:
        for optimizer in OPTIMIZERS:
            bar.set_description_str(f"{optimizer} on {MODEL_NAME}")
            warm_up(optimizer, data)
            runs.append(train_run(optimizer, data, epochs=options.epochs, seed=options.seed, on_epoch=bar.update))
    finally:
        bar.close()

    steps = options.epochs * STEPS_PER_EPOCH
    summary = (
        f"Text: character-level GPT ({LAYERS} layers, width {WIDTH}, {HEADS} heads, context {CONTEXT}, "
        f"{len(data.vocabulary)} characters) on CPython's pydoc topics ({data.train.shape[0]} training and "
        f"{data.validation.shape[0]} validation characters), {steps} steps of batch {BATCH_SIZE}, seed "
        f"{options.seed}, device {options.device}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}"
    )
    metadata = {
        "started_utc": started,
        "epochs": options.epochs,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "context": CONTEXT,
        "width": WIDTH,
        "heads": HEADS,
        "layers": LAYERS,
        "vocabulary": len(data.vocabulary),
        "train_characters": int(data.train.shape[0]),
        "validation_characters": int(data.validation.shape[0]),
        **run_environment(options.seed, options.device),
    }
    return TaskReport(
        task="text",
        summary=summary,
        runs=runs,
        columns=COLUMNS,
        history_label="validation loss (nats per character)",
        title="pydoc topics, character-level GPT: validation loss",
        metadata=metadata,
    )
