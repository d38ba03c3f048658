"""The README's functional-loop example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_example_runs_and_trains():
    blocks = _python_blocks()
    assert blocks, "README.md has no python example"
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 20
    namespace: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), namespace)
    model = namespace["model"]
    initial = {name: p.detach() for name, p in model.named_parameters()}  # type: ignore[attr-defined]
    initial_loss = namespace["loss_fn"](initial, namespace["x"], namespace["y"])  # type: ignore[operator]
    final_loss = namespace["loss_fn"](namespace["params"], namespace["x"], namespace["y"])  # type: ignore[operator]
    assert float(final_loss) < 0.7 * float(initial_loss)


def test_readme_has_two_setup_commands():
    commands = re.findall(r"```\n(python -m venv .*?)\n```", README.read_text())
    assert len(commands) == 2
    assert commands[0].endswith("python -m macfn demo")
    assert "python -m pytest" in commands[1]
    assert all("pip install torch==2.13.0" in command for command in commands)
