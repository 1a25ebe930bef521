"""What a training run leaves in its workdir, by name, the metric its summary ranks by, and
how a file that another process may read is written.

The loop writes these; the report, the sweep and the demo read them. They live here, apart
from the loop, so that reading a finished run never imports the trainer and TensorFlow
with it.
"""

from __future__ import annotations

import os
import uuid

from etils import epath

RESULTS_FILE = "results.json"  # the run's summary: best and last evaluation, steps
BEST_METRIC = "eval/student/top1"  # what "best" means in that summary
# Config keys that may change between runs of one experiment without invalidating its
# workdir (the guard in `config_guard` ignores them).
COSMETIC_KEYS = ("log_every_steps", "tensorboard", "eval_only", "profile_steps")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` so that a reader sees the old file, or none, or all of the new
    one: never part of it.

    The text goes to a temporary file of a unique name in the same folder (so on the same
    filesystem), which then replaces `path` in one rename: atomic on POSIX filesystems. On
    an object store (gs://...) where a rename is a copy, the object's own write is what is
    atomic. Every file one process writes and another (or a later run) reads goes through
    here: config.json, results.json, checkpoints' integrity.json, a rewritten metrics.jsonl.
    """
    path = epath.Path(path)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        temporary.write_text(text)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
