"""The property-testing example in docs/proofs.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "proofs.md"


def test_own_layer_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(blocks[0], f"{DOC.name}[0]", "exec"), {})
    finally:
        torch.set_num_threads(threads)
