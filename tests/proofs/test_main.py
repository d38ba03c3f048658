"""``python -m proofs`` runs every check, prints one line per claim and exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proofs", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _claim_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line[:4] in ("PASS", "FAIL", "INFO")]


def test_quick_report() -> None:
    result = _run("--quick", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = _claim_lines(result.stdout)
    assert not [line for line in lines if line.startswith("FAIL")]
    assert sum("proved symbolically" in line for line in lines) >= 5
    assert sum("property-tested with" in line for line in lines) >= 10
    assert sum("oracle: curvlinops" in line for line in lines) >= 5
    assert sum(line.startswith("INFO") and "measured" in line for line in lines) == 2
    for source in ("[paper]", "[derived]", "[authors' code]"):
        assert any(source in line for line in lines), source
    assert "every claim holds" in result.stdout


@pytest.mark.slow
def test_full_report() -> None:
    result = _run(timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = _claim_lines(result.stdout)
    assert not [line for line in lines if line.startswith("FAIL")]
    counts = [int(match) for match in re.findall(r"property-tested with (\d+) examples", result.stdout)]
    assert max(counts) >= 100  # the full run draws 100 examples per cheap claim
    assert "every claim holds" in result.stdout


def test_rejects_unknown_option() -> None:
    result = _run("--no-such-option", timeout=120)
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
