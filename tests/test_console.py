"""The console: one-line errors for bad configs and missing data, reported before
TensorFlow is imported, and bkd_jax's INFO lines visible from plain Python."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from bkd_jax import console
from bkd_jax.config_defaults import base_config
from bkd_jax.data import datasets

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
# Runs `python -m bkd_jax.main ARGS` in-process and reports, as it exits, whether
# TensorFlow had been imported by then.
PROBE = """
import runpy, sys
sys.argv = ["bkd_jax.main", *sys.argv[1:]]
try:
    runpy.run_module("bkd_jax.main", run_name="__main__")
finally:
    print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def run_main(*args: str, cwd: pathlib.Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("distill.kd.temprature", "unknown field distill.kd.temprature; did you mean temperature?"),
        ("distill.dkd.beta", "unknown field distill.dkd; did you mean kd?"),
        ("optimm.momentum", "unknown field optimm; did you mean optim?"),
        ("seed.value", "config.seed is a value, not a group of fields: no value in it"),
        ("distill.kd.temperature", None),
        ("dataset.data_dir", None),
    ],
)
def test_unknown_field_names_the_field_and_the_closest_one(field, message):
    config = base_config("digits", teacher="resnet8", student="resnet8", method="kd")
    assert console.unknown_field(config, field) == message


def test_unknown_field_without_a_close_name_lists_the_known_ones():
    config = ml_collections.ConfigDict({"optim": {"momentum": 0.9, "nesterov": False}})
    assert console.unknown_field(config, "optim.xyz") == (
        "unknown field optim.xyz; known: momentum, nesterov"
    )


def _dataset(name: str, data_dir: str | None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": name, "data_dir": data_dir})


def test_tfds_data_must_be_prepared_in_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir /nonexistent is not a directory"):
        console.check_data_present(_dataset("cifar100", "/nonexistent"))
    (tmp_path / "cifar100").mkdir()  # a folder without a prepared version is not enough
    with pytest.raises(ValueError, match=f"tfds build cifar100 --data_dir={tmp_path}`"):
        console.check_data_present(_dataset("cifar100", str(tmp_path)))
    (tmp_path / "cifar100" / "3.0.2").mkdir()
    (tmp_path / "cifar100" / "3.0.2" / "dataset_info.json").write_text("{}")
    console.check_data_present(_dataset("cifar100", str(tmp_path)))
    console.check_data_present(_dataset("cifar100", "gs://bucket/tfds"))  # left to TFDS


def test_tfds_default_data_dir_is_tfds_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=f"data_dir {tmp_path} has no cifar10"):
        console.check_data_present(_dataset("cifar10", None))


def test_image_folder_and_digits(tmp_path):
    with pytest.raises(ValueError, match="is not a directory; image_folder reads"):
        console.check_data_present(_dataset("image_folder", str(tmp_path / "missing")))
    console.check_data_present(_dataset("image_folder", str(tmp_path)))
    console.check_data_present(_dataset("digits", None))


def _checkpoints(teacher: str | None, student: str | None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"teacher_checkpoint": teacher, "student_checkpoint": student})


def _file_config(value: str) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The locked config `--config=value` builds (as the command line does), and that argv."""
    value = str(REPO / value)  # an absolute path stays as it is
    argv = ["main", f"--config={value}"]
    config = console.config_from_file(value)
    config.lock()
    return config, argv


@pytest.mark.parametrize("config_file", ["configs/cifar100.py", "configs/imagenet.py"])
@pytest.mark.parametrize("name", datasets.DATASETS)
def test_changed_dataset_name_brings_that_data_sets_fields(config_file, name):
    config, argv = _file_config(config_file)
    config.dataset.name = name  # --config.dataset.name=<name>
    config.dataset.data_dir = "/data"  # set on the command line too: kept
    console.follow_dataset_name(config, argv)
    expected = datasets.default_dataset_config(name)
    expected.data_dir = "/data"
    assert config.dataset.to_dict() == expected.to_dict()
    assert config.is_locked and config.dataset.is_locked


def test_fields_a_recipe_set_survive_a_dataset_change_or_are_refused(tmp_path):
    config, argv = _file_config("configs/cifar100.py:method=mlkd")
    config.dataset.name = "digits"
    console.follow_dataset_name(config, argv)
    assert config.dataset.strong_view == "randaugment"  # MLKD's, not the digits' default
    assert (config.dataset.image_size, config.dataset.augment) == (8, "none")

    config_file = tmp_path / "folder_config.py"
    config_file.write_text(
        textwrap.dedent("""
        from bkd_jax.config_defaults import base_config

        def get_config():
            config = base_config("image_folder", teacher="resnet8", student="resnet8", method="ce")
            config.dataset.bad_files = "skip"
            return config
        """)
    )
    config, argv = _file_config(str(config_file))
    config.dataset.name = "cifar10"
    with pytest.raises(ValueError, match=r"dataset\.bad_files is a field of image_folder, not of"):
        console.follow_dataset_name(config, argv)


def test_missing_checkpoints_are_named(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=f"config.teacher_checkpoint {missing} does not exist"):
        console.check_checkpoints_present(_checkpoints(missing, None), needs_teacher=True)
    with pytest.raises(ValueError, match=f"config.student_checkpoint {missing} does not exist"):
        console.check_checkpoints_present(_checkpoints(str(tmp_path), missing), True)
    console.check_checkpoints_present(_checkpoints(str(tmp_path), str(tmp_path)), True)
    console.check_checkpoints_present(_checkpoints("gs://bucket/teacher", None), True)
    # A method without a teacher (ce) never loads it, so it is not checked.
    console.check_checkpoints_present(_checkpoints(missing, None), needs_teacher=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config=configs/cifar100.py:student=resnet32x4,method=ce",
             "--config.dataset.data_dir=/nonexistent"],
            "error: TFDS data set 'cifar100' is not prepared: data_dir /nonexistent is not a",
        ),
        (
            ["--config=configs/demo.py", "--config.distill.blockkd.temprature=2"],
            "error: unknown field distill.blockkd.temprature; did you mean temperature?\n",
        ),
        (
            ["--config=configs/demo.py:methd=kd"],
            "error: --config=configs/demo.py:methd=kd: ValueError: unknown config argument "
            "'methd'; known: role, teacher, student, method, seed, quick\n",
        ),
        (
            ["--config=configs/cifar10.py"],
            f"error: --config: no config file configs/cifar10.py (relative paths start at {REPO})",
        ),
        (
            ["--config=configs/demo.py:method=kd", "--config.teacher_checkpoint=/no/teacher"],
            "error: config.teacher_checkpoint /no/teacher does not exist; it should be the "
            "workdir of a method=ce run",
        ),
        (
            ["--config=configs/demo.py", "--config.distill.blockkd.temperature=warm"],
            "error: flag --config.distill.blockkd.temperature=warm: could not convert string to "
            "float",
        ),
    ],
)  # fmt: skip
def test_bad_command_lines_fail_in_one_line_before_tensorflow_loads(tmp_path, args, message):
    result = run_main(*args, f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "tensorflow imported: False" in result.stdout
    assert not (tmp_path / "run").exists()


def test_help_does_not_load_tensorflow():
    result = run_main("--help")
    assert "--workdir: Directory for checkpoints, logs and results." in result.stdout
    assert "tensorflow imported: False" in result.stdout


def test_configure_logging_shows_own_info_lines_from_python(tmp_path):
    # One INFO record as the loop logs it (from a file under bkd_jax/), one as orbax does.
    script = textwrap.dedent(
        """
        import logging as py_logging, os
        from absl import logging
        from bkd_jax import console

        console.configure_logging()
        console.configure_logging()  # twice: still one handler
        logger = logging.get_absl_logger()
        loop_py = os.path.join(console._PACKAGE_DIR, "training", "loop.py")
        logger.handle(
            logger.makeRecord("absl", py_logging.INFO, loop_py, 242, "Resuming from step 7.",
                              (), None)
        )
        logging.info("a library's INFO line")
        logging.warning("a library's warning")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("I") and lines[0].endswith(" loop.py:242] Resuming from step 7.")
    assert lines[1].startswith("W") and lines[1].endswith("] a library's warning")


@pytest.mark.parametrize(
    ("with_teacher", "title"), [(False, "Top-1: best 50.00%"), (True, "Student top-1: best 50.00%")]
)
def test_summary_says_student_only_when_there_is_a_teacher(caplog, with_teacher, title):
    from bkd_jax.training import loop

    last = {"step": 8, "epoch": 2.0, "eval/student/top1": 0.25, "eval/student/top5": 0.75}
    if with_teacher:
        last["eval/teacher/top1"] = 0.875
    best = {**last, "step": 4, "epoch": 1.0, "eval/student/top1": 0.5}
    with caplog.at_level("INFO"):
        loop._log_summary({"best": best, "last": last}, pathlib.Path("/w"))
    (message,) = [r.getMessage() for r in caplog.records if "top-1" in r.getMessage().lower()]
    assert message.startswith(f"{title} (step 4, epoch 1.0), last 25.00%; top-5: best 75.00%")
    assert ("Last top-1 of teacher 87.50%." in message) == with_teacher
