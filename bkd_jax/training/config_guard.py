"""The workdir's config guard: one experiment per workdir.

A run writes its resolved config to ``workdir/config.json`` before anything else; a rerun
with the same workdir resumes only when its config is the same, so a changed learning rate
or model cannot silently continue another experiment's checkpoints. Readers (e.g. the
teacher loader naming the model a workdir holds) use `read_config`.

On several processes, process 0 alone reads and writes the file and hands the text it read
to the others through a collective (`multihost_utils.broadcast_one_to_all`). So no process
parses a file another one may be writing (on a shared filesystem, processes start seconds
apart), and every process reaches the same verdict from the same bytes: all go on, or all
raise the same error. A collective rather than JAX's distributed key-value store, which
would carry the text as a string, because only the collective is public JAX API. The
file itself is written atomically, for readers outside the run.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from bkd_jax.training.run_files import atomic_write_text

CONFIG_FILE = "config.json"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.path: leaf}; an empty dict is kept as a leaf."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _show(flat: Mapping[str, Any], key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "<absent>"


def _ignored(path: str, ignore: Collection[str]) -> bool:
    return any(path == key or path.startswith(f"{key}.") for key in ignore)


def read_config(workdir: str | epath.PathLike) -> dict[str, Any] | None:
    """The config a workdir was started with, or None when it has none (or not JSON)."""
    path = epath.Path(workdir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_text(path: epath.Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _from_process_zero(text: str | None) -> str | None:
    """`text` as process 0 has it, on every process: two small broadcasts, its length (-1
    for None), then its bytes. Every process must call it."""
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(b"" if text is None else text.encode(), np.uint8)
    size = -1 if text is None else data.size
    size = int(multihost_utils.broadcast_one_to_all(np.int32(size)))
    if size <= 0:
        return None if size < 0 else ""
    if jax.process_index() != 0:
        data = np.zeros(size, np.uint8)
    return multihost_utils.broadcast_one_to_all(data).tobytes().decode()


def check_or_write_config(
    workdir: str | epath.PathLike,
    config: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
) -> None:
    """Refuses to resume a workdir with a different config; writes it on the first run.

    The config (e.g. `ConfigDict.to_dict()`) is compared as JSON, so tuples equal lists
    and values JSON cannot hold compare by their `str`. Process 0 reads and writes the
    file (atomically; an existing one is never overwritten) and every process compares
    what process 0 read, so all of them must call this.

    Args:
      workdir: the run's directory.
      config: the resolved config, nested mappings of JSON-able values.
      ignore: dotted keys (and everything under them) that may change between runs of the
        same experiment, e.g. {"log_every_steps"}. They are still written on the first run.

    Raises:
      ValueError: when `workdir/config.json` exists and differs outside `ignore` (the
        message lists each differing key with its old and new value), or is not JSON.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    new = json.loads(json.dumps(config, default=str))
    existing = None
    if jax.process_index() == 0:
        existing = _read_text(path)
        if existing is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    existing = _from_process_zero(existing)
    if existing is None:
        return
    try:
        old = json.loads(existing)
    except ValueError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}), so the config this workdir was started with "
            "is unknown; use a fresh --workdir."
        ) from None
    old, new = _flatten(old), _flatten(new)
    diffs = [
        f"  {key}: {_show(old, key)} -> {_show(new, key)}"
        for key in sorted(old.keys() | new.keys())
        if not _ignored(key, ignore) and (key in old, old.get(key)) != (key in new, new.get(key))
    ]
    if diffs:
        raise ValueError(
            f"The config differs from the one this workdir was started with ({path}):\n"
            + "\n".join(diffs)
            + "\nUse a fresh --workdir for a new experiment."
        )
