"""The text demo task: the data, the model's attention statistics, and one short run of the CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.func import functional_call

import macfn
from macfn.demo import text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUBPROCESS_TIMEOUT_S = 300


def test_data_split_and_windows():
    data = text.load_data(torch.device("cpu"))
    total = data.train.shape[0] + data.validation.shape[0]
    assert total == len(text.load_text())
    assert data.validation.shape[0] == total - int(total * (1.0 - text.VALIDATION_FRACTION))
    assert int(data.train.max()) < len(data.vocabulary)
    assert int(data.train.min()) >= 0
    x, y = text.windows(data.train, torch.tensor([0, 5]))
    assert x.shape == y.shape == (2, text.CONTEXT)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tuning = text.load_data(torch.device("cpu"), tuning=True)
    assert tuning.train.shape[0] + tuning.validation.shape[0] == data.train.shape[0]


def test_model_declares_fused_attention():
    torch.manual_seed(0)
    model = text.CharGPT(11, width=16, heads=2, layers=1)
    params = {name: p.detach() for name, p in model.named_parameters()}
    idx = torch.randint(0, 11, (2, 9))

    def loss_fn(p, tokens):
        logits = functional_call(model, p, (tokens[:, :-1],))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))

    _, stats, _ = macfn.grad_and_stats(model, loss_fn, attention=model.attention())(params, idx)
    assert stats["blocks.0.attn.qkv.weight"].shape == (3, 17)
    # The LM head shares the token embedding, so that weight is preconditioned with the head's input.
    assert stats["tok.weight"].shape == (1, 16)
    assert "head.weight" not in params


def test_cli_text_one_epoch(tmp_path: Path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "macfn", "demo", "--task", "text", "--epochs", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line) and "-" in line) + 1
    rows = [line.split() for line in lines[start : start + len(text.OPTIMIZERS)]]
    assert [row[0] for row in rows] == list(text.OPTIMIZERS)

    assert (out / "text.png").read_bytes()[:8] == PNG_SIGNATURE
    document = json.loads((out / "text.json").read_text())
    assert document["metadata"]["steps"] == text.STEPS_PER_EPOCH
    uniform = math.log(document["metadata"]["vocabulary"])
    for row, run in zip(rows, document["runs"]):
        assert [point["steps"] for point in run["history"]] == [0, text.STEPS_PER_EPOCH]
        first, last = run["history"][0]["loss"], run["history"][1]["loss"]
        # 25 steps already beat the initial model and the uniform guess over the characters.
        assert last < first, run["optimizer"]
        assert last < uniform, run["optimizer"]
        assert float(row[3]) == round(last, 4)
        assert run["metrics"]["tokens_per_s"] > 0
