"""The README's examples run and their assertions hold."""

from __future__ import annotations

import json
import pathlib
import re
import shlex

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


def first_run_commands() -> list[list[str]]:
    """The arguments of each `python -m bkd_jax.main` command of "Your first training run"."""
    section = README.read_text().split("## Your first training run\n", 1)[1].split("\n## ", 1)[0]
    joined = section.replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if "python -m bkd_jax.main" in line]
    return [shlex.split(line)[3:] for line in lines]


def test_readme_first_run_is_a_teacher_then_a_student_distilled_from_it(monkeypatch):
    from bkd_jax import console
    from bkd_jax.training.validation import validate_config

    monkeypatch.chdir(README.parent)  # the commands run from the root of a clone
    teacher, student = first_run_commands()
    workdirs = [console._flag_value(args, "workdir") for args in (teacher, student)]
    assert console._flag_value(student, "config.teacher_checkpoint") == workdirs[0]
    methods = []
    for args in (teacher, student):
        assert console.explain_config_error(args) is None  # the file loads, fields exist
        config = console.config_from_file(console._flag_value(args, "config"))
        config.teacher_checkpoint = console._flag_value(args, "config.teacher_checkpoint")
        validate_config(config)
        methods.append(config.distill.method)
    assert methods[0] == "ce" and methods[1] != "ce"
