"""End-to-end tests of ``python -m macfn demo`` and its helpers, on the real digits data."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from macfn.__main__ import main
from macfn.demo import TASKS, HistoryPoint, make_options, run_demo
from macfn.demo import digits
from macfn.demo._report import Column, RunRecord, TaskReport, format_table, save_report

PAIRS = {(optimizer, model) for model in digits.MODELS for optimizer in digits.OPTIMIZERS}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUBPROCESS_TIMEOUT_S = 300


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "macfn", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def table_rows(stdout: str) -> list[list[str]]:
    """Return the cells of the table rows, the lines between the dashed rule and the next blank line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"[- ]+", line) and "-" in line) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_import_macfn_skips_demo_dependencies() -> None:
    # torch 2.13 imports tqdm itself when it is installed (torch.hub), so the check covers the
    # modules that importing macfn adds after torch.
    code = (
        "import sys, torch; before = set(sys.modules); "
        "import macfn, macfn.demo, macfn.__main__; "
        "added = set(sys.modules) - before; "
        "print(sorted(m for m in added if m.split('.')[0] in ('sklearn', 'matplotlib', 'tqdm')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread, as the demo does, and restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_cli_help_names_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    assert "demo" in capsys.readouterr().out

    with pytest.raises(SystemExit) as demo:
        main(["demo", "--help"])
    assert demo.value.code == 0
    text = capsys.readouterr().out
    for option in ("--task", "--epochs", "--out", "--device", "--seed", "--threads", "--quiet"):
        assert option in text
    assert "digits" in text
    assert f"default {TASKS['digits'].default_epochs} epochs" in " ".join(text.split())


def test_cli_one_epoch_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # No --quiet: stderr is a pipe here, so the progress bar must switch itself off.
    result = run_cli("demo", "--epochs", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    rows = table_rows(result.stdout)
    assert len(rows) == 6
    assert {(row[0], row[1]) for row in rows} == PAIRS
    for row in rows:
        accuracy = float(row[3])
        assert 0.0 <= accuracy <= 1.0

    for name in ("digits.png", "digits.csv", "digits.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "digits.png").read_bytes()[:8] == PNG_SIGNATURE

    with (out / "digits.csv").open(newline="") as handle:
        records = list(csv.DictReader(handle))
    assert {(r["optimizer"], r["model"]) for r in records} == PAIRS
    for record in records:
        assert 0.0 <= float(record["test_accuracy"]) <= 1.0
        assert float(record["wall_time_s"]) > 0.0

    document = json.loads((out / "digits.json").read_text())
    assert document["metadata"]["epochs"] == 1
    assert len(document["runs"]) == 6
    for run in document["runs"]:
        assert [point["steps"] for point in run["history"]] == [0, 23]


def test_run_demo_one_epoch(tmp_path: Path) -> None:
    threads_before = torch.get_num_threads()
    result = run_demo(epochs=1, out=tmp_path, quiet=True, seed=3)
    assert torch.get_num_threads() == threads_before

    runs = result.report.runs
    assert {(run.optimizer, run.model) for run in runs} == PAIRS
    for run in runs:
        assert 0.0 <= run.metrics["test_accuracy"] <= 1.0
        assert math.isfinite(run.metrics["train_loss"])
        assert run.metrics["steps_per_s"] > 0.0
        assert len(run.history) == 2
        assert run.history[1].seconds == run.metrics["wall_time_s"]
        assert run.history[1].loss == run.metrics["train_loss"]
        assert run.history[1].loss < run.history[0].loss

    # Same seed, so every optimizer starts a model from the same weights.
    for model in digits.MODELS:
        initial = {run.history[0].loss for run in runs if run.model == model}
        assert len(initial) == 1

    assert set(result.files) == {"png", "csv", "json"}
    for path in result.files.values():
        assert path.parent == tmp_path
        assert path.stat().st_size > 0
    printed = {(row[0], row[1]) for row in table_rows(result.text)}
    assert printed == PAIRS


def test_mac_mlp_default_epochs_accuracy(one_thread: None) -> None:
    data = digits.load_data(0, torch.device("cpu"))
    run = digits.train_run("MLP", "MAC", data, epochs=TASKS["digits"].default_epochs, seed=0)
    # Measured 0.975 with seed 0 (torch 2.13), and 0.972 to 0.983 over seeds 0 to 2 on the test split.
    assert run.metrics["test_accuracy"] > 0.9


def test_batches_identical_across_optimizers(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    data = digits.load_data(0, torch.device("cpu"))
    build_model = digits.build_model
    seen: dict[str, list[Tensor]] = {}

    for optimizer in digits.OPTIMIZERS:
        inputs = seen.setdefault(optimizer, [])

        def record(module: torch.nn.Module, args: tuple[Tensor, ...], inputs: list[Tensor] = inputs) -> None:
            if torch.is_grad_enabled():
                inputs.append(args[0].detach().clone())

        def build_recording_model(name: str, record: object = record) -> torch.nn.Module:
            model = build_model(name)
            model.register_forward_pre_hook(record)  # type: ignore[arg-type]
            return model

        monkeypatch.setattr(digits, "build_model", build_recording_model)
        digits.train_run("MLP", optimizer, data, epochs=1, seed=5)

    reference = seen["MAC"]
    assert len(reference) == 23
    for optimizer in ("SGD", "AdamW"):
        assert len(seen[optimizer]) == len(reference)
        for got, expected in zip(seen[optimizer], reference):
            assert torch.equal(got, expected)


def test_load_data_standardises_with_train_statistics() -> None:
    from sklearn.datasets import load_digits

    data = digits.load_data(0, torch.device("cpu"))
    assert data.train_x.shape == (1437, 64)
    assert data.eval_x.shape == (360, 64)

    varying = data.train_x.std(dim=0) > 0
    torch.testing.assert_close(data.train_x.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train_x.std(dim=0)[varying], torch.ones(int(varying.sum())), atol=1e-5, rtol=0)

    # Stratified: each class's share of the test split is within one image of its share overall.
    _, labels = load_digits(return_X_y=True)
    overall = torch.bincount(torch.as_tensor(labels), minlength=10).double() / len(labels)
    held_out = torch.bincount(data.eval_y, minlength=10).double()
    assert torch.all((held_out - overall * 360).abs() <= 1.0)


def test_load_data_validation_excludes_test_split() -> None:
    test_split = digits.load_data(0, torch.device("cpu"), holdout="test")
    validation_split = digits.load_data(0, torch.device("cpu"), holdout="validation")
    test_rows = set(test_split.eval_index.tolist())
    training_rows = set(test_split.train_index.tolist())
    validation_rows = set(validation_split.eval_index.tolist())
    fitting_rows = set(validation_split.train_index.tolist())

    assert len(test_rows) == 360
    assert test_rows.isdisjoint(training_rows)
    assert len(validation_rows) == 288
    assert validation_rows.isdisjoint(fitting_rows)
    assert validation_rows | fitting_rows == training_rows


def test_cli_rejects_zero_epochs(tmp_path: Path) -> None:
    result = run_cli("demo", "--epochs", "0", "--out", str(tmp_path / "unused"), cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --epochs: invalid value 0: expected an integer >= 1" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--epochs", "two"], r"argument --epochs: invalid value 'two': expected an integer >= 1"),
        (["--epochs", "-3"], r"argument --epochs: invalid value -3"),
        (["--threads", "0"], r"argument --threads: invalid value 0"),
        (["--seed", "-1"], r"argument --seed: invalid value -1: expected an integer in \[0, 4294967295\]"),
        (["--seed", "4294967296"], r"argument --seed: invalid value 4294967296"),
        (["--task", "nope"], r"argument --task: invalid choice: 'nope'"),
        (["--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
    ],
)
def test_cli_rejects_bad_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], pattern: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args, "--out", str(tmp_path / "unused")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert re.search(pattern, captured.err), captured.err
    assert captured.out == ""
    assert not (tmp_path / "unused").exists()


def test_cli_rejects_out_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    existing_file = tmp_path / "existing_file"
    existing_file.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--epochs", "1", "--out", str(existing_file)])
    assert exit_info.value.code == 2
    assert f"Invalid out='{existing_file}': it exists and is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"epochs": 0}, r"Invalid epochs=0: expected an integer >= 1"),
        ({"epochs": True}, r"Invalid epochs=True"),
        ({"epochs": 2.5}, r"Invalid epochs=2\.5"),
        ({"seed": 2**32}, r"Invalid seed=4294967296: expected an integer in \[0, 4294967295\]"),
        ({"threads": 0}, r"Invalid threads=0"),
        ({"task": "nope"}, r"Invalid task='nope': expected one of .*digits"),
        ({"device": "gpu"}, r"Invalid device='gpu': expected one of auto, cpu, cuda"),
        ({"out": ""}, r"Invalid out=''"),
    ],
)
def test_make_options_rejects_bad_value(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_options(**changes)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_make_options_rejects_missing_cuda() -> None:
    with pytest.raises(ValueError, match=r"Invalid device='cuda': .*\. Use device 'cpu' or 'auto'"):
        make_options(device="cuda")


def test_make_options_resolves_auto_device() -> None:
    options = make_options(device="auto")
    assert options.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert options.epochs == TASKS["digits"].default_epochs


def test_format_table_aligns_and_marks_gaps() -> None:
    columns = (Column("loss", "loss", ".3f"), Column("accuracy", "acc", ".2f"))
    runs = [
        RunRecord("MAC", "MLP", [], {"loss": 0.12345, "accuracy": 0.5}),
        RunRecord("LongName", "CNN", [], {"loss": float("nan")}),
    ]
    lines = format_table(runs, columns).splitlines()
    assert lines[0].split() == ["optimizer", "model", "loss", "acc"]
    assert lines[2].split() == ["MAC", "MLP", "0.123", "0.50"]
    assert lines[3].split() == ["LongName", "CNN", "nan", "-"]
    assert len({len(line) for line in lines[1:3]}) == 1


def test_save_report_survives_diverged_run(tmp_path: Path) -> None:
    history = [HistoryPoint(0.0, 0, 2.3), HistoryPoint(0.5, 10, float("nan")), HistoryPoint(1.0, 20, float("inf"))]
    report = TaskReport(
        task="toy",
        summary="toy",
        runs=[RunRecord("SGD", "MLP", history, {"loss": float("nan")})],
        columns=(Column("loss", "loss"),),
        history_label="loss",
        title="toy",
    )
    files = save_report(report, tmp_path / "nested" / "out")
    assert files["png"].read_bytes()[:8] == PNG_SIGNATURE
    document = json.loads(files["json"].read_text())
    assert math.isnan(document["runs"][0]["metrics"]["loss"])
    assert document["runs"][0]["history"][2] == {"seconds": 1.0, "steps": 20, "loss": math.inf}
