"""The README's library example runs and its assertions hold."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_stepping_stone_example_runs():
    (example,) = python_blocks()
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.stone_logits[3].shape == (8, 100)
    assert len(out.features) == 3


def test_readme_commands_name_existing_modules_and_configs():
    text = README.read_text()
    root = README.parent
    for module in set(re.findall(r"python -m (bkd_jax\.\w+)", text)):
        assert (root / (module.replace(".", "/") + ".py")).is_file(), module
    for config in set(re.findall(r"(configs/\w+\.py)", text)):
        assert (root / config).is_file(), config
