"""Every python block in the guides runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = ["api.md"]


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.DOTALL)


@pytest.mark.parametrize(
    ("name", "index"), [(name, index) for name in GUIDES for index in range(len(_blocks(name)))]
)
def test_guide_example_runs(name, index):
    code = _blocks(name)[index]
    exec(compile(code, f"{name}[{index}]", "exec"), {})
