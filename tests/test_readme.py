"""The README's examples run and their assertions hold."""

from __future__ import annotations

import json
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    """The README's one ```python block that contains `containing`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def run_block(containing: str) -> dict:
    namespace: dict = {}
    exec(compile(python_block(containing), str(README), "exec"), namespace)
    return namespace


def test_readme_stepping_stone_example_runs():
    out = run_block("stepping_stones(")["out"]
    assert out.stone_logits[3].shape == (8, 100)
    assert len(out.features) == 3


def test_readme_distiller_registers_and_trains_ten_steps(tmp_path):
    from bkd_jax import distillers
    from bkd_jax.config_defaults import base_config
    from bkd_jax.training import loop

    teacher = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    teacher.num_train_steps, teacher.tensorboard = 10, False
    loop.train_and_evaluate(teacher, str(tmp_path / "teacher"))

    if "logit_mse" not in distillers.available():  # the README's code, run once per process
        run_block('name="logit_mse"')
    config = base_config("digits", teacher="resnet8", student="resnet8", method="kd")
    config.distill = distillers.default_config("logit_mse")
    config.distill.logit_mse.mse_weight = 0.5
    config.teacher_checkpoint = str(tmp_path / "teacher")
    config.num_train_steps, config.log_every_steps, config.tensorboard = 10, 1, False
    summary = loop.train_and_evaluate(config, str(tmp_path / "student"))
    assert summary["steps"] == 10
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").open()]
    mse = [r["train/mse"] for r in rows if "train/mse" in r]
    ce = [r["train/loss"] - 0.5 * r["train/mse"] for r in rows if "train/mse" in r]
    assert len(mse) == 10 and all(c > 0 for c in ce)  # loss = 1.0 CE + 0.5 MSE
    assert mse[-1] < mse[0]


def test_readme_commands_name_existing_modules_and_configs():
    text = README.read_text()
    root = README.parent
    for module in set(re.findall(r"python -m (bkd_jax(?:\.\w+)+)", text)):
        path = root / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
    for config in set(re.findall(r"(configs/\w+\.py)", text)):
        assert (root / config).is_file(), config


def test_readme_token_blocknet_example_runs():
    namespace = run_block("prefix_tokens=1,")
    assert namespace["mine"].prefix_tokens == 1
    assert namespace["taps"].blocks[0].shape == (4, 8, 8, 64)
