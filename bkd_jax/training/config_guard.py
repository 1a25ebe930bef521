"""The workdir's config guard: one experiment per workdir.

A run writes its resolved config to ``workdir/config.json`` before anything else; a rerun
with the same workdir resumes only when its config is the same, so a changed learning rate
or model cannot silently continue another experiment's checkpoints. Readers (e.g. the
teacher loader naming the model a workdir holds) use `read_config`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

import jax
from etils import epath

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


def check_or_write_config(
    workdir: str | epath.PathLike,
    config: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
) -> None:
    """Refuses to resume a workdir with a different config; writes it on the first run.

    The config (e.g. `ConfigDict.to_dict()`) is compared as JSON, so tuples equal lists
    and values JSON cannot hold compare by their `str`. Process 0 writes the file; an
    existing file is never overwritten.

    Args:
      workdir: the run's directory.
      config: the resolved config, nested mappings of JSON-able values.
      ignore: dotted keys (and everything under them) that may change between runs of the
        same experiment, e.g. {"log_every_steps"}. They are still written on the first run.

    Raises:
      ValueError: when `workdir/config.json` exists and differs outside `ignore`; the
        message lists each differing key with its old and new value.
    """
    path = epath.Path(workdir) / CONFIG_FILE
    new = json.loads(json.dumps(config, default=str))
    if not path.exists():
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        return
    old, new = _flatten(json.loads(path.read_text())), _flatten(new)
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
