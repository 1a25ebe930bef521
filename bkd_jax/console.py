"""The console of bkd_jax's commands and notebooks: quick, short errors and readable logs.

A mistake in a command line should be reported within seconds, in one line that names it,
not after TensorFlow and orbax have loaded and not as a 50-line traceback. So this module
imports neither: it checks the `--config` argument and its `--config.field=value`
overrides when flag parsing fails (an unknown field gets "did you mean"), and checks that
the data set's folder and the checkpoints the config names exist before the input
pipeline is imported and anything is compiled. Config files are found
(`packaged_config_file`) and loaded (`load_config_file`) here, for every command and test
that reads one.

Logging: the commands and notebooks show bkd_jax's own INFO lines (the run, resuming, the
final accuracies), the libraries' warnings and errors, and not the libraries' INFO lines
(orbax alone logs dozens per checkpoint). `configure_logging()` sets that up; from Python
(a notebook, a script), call it once before `train_and_evaluate`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging as py_logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections
from absl import flags, logging

from bkd_jax.data import datasets

_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parent)
# Lines TensorFlow's native code prints to stderr when it loads: INFO records such as
# "I0000 00:00:17961.. 7296 port.cc:153] oneDNN custom operations are on", and the
# notice that precedes them. Its environment variables no longer silence them.
_NATIVE_NOISE = re.compile(
    r"I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] |WARNING: All log messages before absl::InitializeLog"
)
_TFDS_DATASETS = ("cifar100", "cifar10", "imagenet2012")


def _own_info_or_warning(record: py_logging.LogRecord) -> bool:
    """Keeps warnings and errors, and INFO records logged from bkd_jax's own modules."""
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class _ConsoleHandler(py_logging.StreamHandler):
    """absl's records on stderr outside an absl app (in a notebook or a script)."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(
            py_logging.Formatter(
                "%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s",
                datefmt="%m%d %H:%M:%S",
            )
        )


def configure_logging(verbosity: int | None = None) -> None:
    """Shows bkd_jax's INFO lines and every library's warnings and errors on stderr.

    Under `absl.app.run` (the commands) it keeps absl's handler and `--verbosity`; from
    Python it logs at `verbosity` (default INFO) through a handler of its own, so
    `loop.train_and_evaluate` prints its INFO lines in a notebook. With a verbosity above
    INFO (`--verbosity=1`), the libraries' INFO lines are shown too. Calling it again
    changes nothing but the verbosity.

    Args:
      verbosity: absl verbosity (`absl.logging.INFO`, `DEBUG`, ...); None keeps
        `--verbosity` in a command and means INFO from Python.
    """
    if flags.FLAGS.is_parsed():
        if verbosity is not None:
            logging.set_verbosity(verbosity)
        handler = logging.get_absl_handler()
    else:
        logging.set_verbosity(logging.INFO if verbosity is None else verbosity)
        logger = logging.get_absl_logger()
        handler = next((h for h in logger.handlers if isinstance(h, _ConsoleHandler)), None)
        if handler is None:
            handler = _ConsoleHandler()
            logger.addHandler(handler)
            logger.propagate = False  # a root handler would print every record twice
    if logging.get_verbosity() <= logging.INFO:
        if _own_info_or_warning not in handler.filters:
            handler.addFilter(_own_info_or_warning)
    else:
        handler.removeFilter(_own_info_or_warning)


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Drops the INFO lines native code prints on stderr inside the block (TensorFlow's,
    when it loads); everything else written to stderr meanwhile is passed on unchanged."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _NATIVE_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def check_data_present(ds_config: Any) -> None:
    """Raises ValueError when the data set's folder is missing, without TensorFlow.

    Only what a directory listing can tell: an `image_folder` root or an `npz` folder that
    is not a folder, or no `<data_dir>/<name>` for a TFDS data set (data_dir None is TFDS's default,
    $TFDS_DATA_DIR or ~/tensorflow_datasets). Remote data dirs (gs://...) are left to the
    input pipeline, which checks everything else.
    """
    data_dir = ds_config.data_dir
    if data_dir and "://" in data_dir:
        return
    layouts = {
        "image_folder": "<data_dir>/<split>/<class>/<image>",
        "npz": "<data_dir>/<split>.npz",
    }
    if ds_config.name in layouts:
        if not data_dir or not os.path.isdir(data_dir):
            raise ValueError(
                f"dataset.data_dir {data_dir!r} is not a directory; {ds_config.name} reads "
                f"{layouts[ds_config.name]}"
            )
    elif ds_config.name in _TFDS_DATASETS:
        root = pathlib.Path(
            data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        ).expanduser()
        # TFDS keeps a prepared data set as <data_dir>/<name>/<version>/dataset_info.json.
        if not any((root / ds_config.name).glob("*/dataset_info.json")):
            where = "is not a directory" if not root.is_dir() else f"has no {ds_config.name}"
            raise ValueError(
                f"TFDS data set {ds_config.name!r} is not prepared: data_dir {root} {where}. "
                "bkd_jax never downloads; prepare it once on a machine with network, "
                f"`tfds build {ds_config.name} --data_dir={root}`, and copy it there, or "
                "set --config.dataset.data_dir to where it is."
            )


def check_checkpoints_present(config: Any, needs_teacher: bool) -> None:
    """Raises ValueError when a checkpoint the run would load is not there, without JAX.

    `config.teacher_checkpoint` (when `needs_teacher`, as the method says) and
    `config.student_checkpoint`, when set; only their existence (remote paths, gs://...,
    are left to the loader, which checks what they hold against the model).
    """
    fields = (["teacher_checkpoint"] if needs_teacher else []) + ["student_checkpoint"]
    for field in fields:
        path = config[field]
        if path and "://" not in path and not os.path.exists(path):
            raise ValueError(
                f"config.{field} {path} does not exist; it should be the workdir of a "
                "method=ce run or a directory written by `python -m bkd_jax.convert`"
            )


def unknown_field(config: Mapping[str, Any], field_path: str) -> str | None:
    """A one-line message when `field_path` ("distill.temprature") is not in `config`."""
    node: Any = config
    done: list[str] = []
    for key in field_path.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
            return f"config.{'.'.join(done)} is a value, not a group of fields: no {key} in it"
        if key not in node:
            name = ".".join([*done, key])
            known = [str(k) for k in node]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
            return f"unknown field {name}; {hint}"
        node = node[key]
        done.append(key)
    return None


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in `argv` (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def packaged_config_file(name: str) -> pathlib.Path:
    """The path of config file `name` of configs/: installed as the package bkd_jax.configs,
    or beside bkd_jax/ in a checkout used without installing."""
    spec = importlib.util.find_spec("bkd_jax.configs")
    if spec is not None and spec.origin is not None:
        return pathlib.Path(spec.origin).parent / name
    return pathlib.Path(__file__).resolve().parents[1] / "configs" / name


def load_config_file(path: str | pathlib.Path) -> ModuleType:
    """A config file as a module; configs/ is a folder of files, not a package."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def explain_config_error(argv: Sequence[str], flag: str = "config") -> str | None:
    """What is wrong with `--config=FILE[:ARGS]` or a `--config.field=value` in `argv`.

    Reloads the config file the way ml_collections does (everything after the first ':'
    is `get_config`'s argument) and walks every override's field path; None when it finds
    nothing wrong there.
    """
    value = _flag_value(argv, flag)
    if value is None:
        return None
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
        return _missing_file(path, flag)
    try:
        config = config_from_file(value)
    except Exception as e:  # any failure of the user's file is the answer
        return f"--{flag}={value}: {type(e).__name__}: {e}"
    prefix = f"--{flag}."
    for item in argv:
        if item.startswith(prefix):
            message = unknown_field(config, item[len(prefix) :].split("=", 1)[0])
            if message:
                return message
    return None


def config_from_file(value: str) -> Any:
    """The config `--config=FILE[:ARGS]` builds, without overrides (everything after the
    first ':' is `get_config`'s argument, as ml_collections reads it)."""
    path, *arg = value.split(":", 1)
    return load_config_file(path).get_config(*arg)


def follow_dataset_name(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
    """Gives `config.dataset` the fields and defaults of the data set it names, when
    `--config.dataset.name` changed the one the `--config` file builds
    (`datasets.switch_dataset`), so that the new data set's own fields are there.

    Raises:
      ValueError: for an unknown data set, or a field set that the new one does not have.
    """
    value = _flag_value(argv, "config")
    if value is None:  # given another way (a --flagfile): nothing to compare with
        return
    built_for = config_from_file(value).dataset.name
    if config.dataset.name != built_for:
        switched = datasets.switch_dataset(config.dataset, built_for)
        switched.lock()  # as the rest of the command line's config: a misspelt field fails
        config.dataset = switched


def _missing_file(path: str, flag: str) -> str:
    return f"--{flag}: no config file {path} (relative paths start at {os.getcwd()})"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(main, flags_parser=parse_flags)`, with one-line
    errors: a missing config file, a bad `--config` argument or override is named instead
    of ml_collections' traceback; other flag errors keep absl's message."""
    config_file = (_flag_value(argv, "config") or "").split(":", 1)[0]
    if config_file and not os.path.isfile(config_file):
        sys.exit(f"error: {_missing_file(config_file, 'config')}")
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # ml_collections raises KeyError, AttributeError, OSError, ...
        lines = str(e).strip().splitlines()
        message = explain_config_error(argv) or (lines[-1] if lines else type(e).__name__)
        sys.exit(f"error: {message}\nPass --helpshort or --helpfull to see help on flags.")
