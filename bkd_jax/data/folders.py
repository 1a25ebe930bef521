"""Image folders laid out as ``root/<split>/<class>/<image>``: their files, checked; no TensorFlow.

Both loaders read image folders through this module: the tf.data pipeline (files read by
path while training) and the device-memory loader (every file decoded once). Classes are
the sorted class folder names of all splits; a split's examples are its files sorted by
class and file name; names starting with "." are ignored. Every split must hold every
class (a class missing from the evaluation split would be scored against nothing).

Each file is checked when its split is scanned: it must start with the header of an image
format both loaders decode (JPEG, PNG, GIF, BMP, WebP, JPEG XL), at the cost of one small
read per file (CIFAR-10's 60,000 JPEGs: seconds). A bad file is an error naming it, or
with ``bad_files="skip"`` is left out and logged. Paths are `etils.epath` paths, so
``gs://`` roots work where epath reaches them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import numpy as np
from absl import logging
from etils import epath

from bkd_jax.data.datasets import BAD_FILES, check_choice

_FILE_CHECK_THREADS = 32  # Header reads are I/O bound (and slow on remote file systems).
_BAD_FILES_SHOWN = 5

_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"\xff\x0a",  # JPEG XL codestream
    b"\x00\x00\x00\x0cJXL \r\n\x87\n",  # JPEG XL container
)


class SplitFiles(NamedTuple):
    """The checked image files of one split, sorted by class and file name."""

    paths: np.ndarray  # object [N] of str
    labels: np.ndarray  # int64 [N]


class ImageFolder:
    """``root/<split>/<class>/<image>``: its classes, and each split's checked files."""

    def __init__(self, root: str | None, bad_files: str = "fail"):
        if not root or not epath.Path(root).is_dir():
            raise ValueError(
                f"image_folder root {root!r} is not a directory; set dataset.data_dir to a "
                "folder laid out as <data_dir>/<split>/<class>/<image>"
            )
        check_choice("bad_files setting", bad_files, BAD_FILES)
        self.root = root
        self._bad_files = bad_files
        self.splits = subfolders(root)
        if not self.splits:
            raise ValueError(
                f"image folder {root} has no split folders; expected {root}/<split>/<class>/<image>"
            )
        classes = {c for split in self.splits for c in subfolders(join(root, split))}
        self.classes = tuple(sorted(classes))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def files(self, split: str) -> SplitFiles:
        """The split's checked files; ValueError naming what is wrong with the split."""
        if split not in self.splits:
            raise ValueError(
                f"image folder {self.root} has no split folder {split!r} with images in "
                f"class subfolders; split folders found: {self.splits}"
            )
        return _scan_split(join(self.root, split), self.classes, self._bad_files)


@functools.lru_cache(maxsize=16)
def _scan_split(split_dir: str, classes: tuple[str, ...], bad_files: str) -> SplitFiles:
    """The files of one split, checked; cached, as both the info and the reader need it."""
    found = subfolders(split_dir)
    if not found:
        raise ValueError(f"split folder {split_dir} has no class folders")
    missing = sorted(set(classes) - set(found))
    if missing:
        shown = ", ".join(missing[:_BAD_FILES_SHOWN]) + (
            ", ..." if len(missing) > _BAD_FILES_SHOWN else ""
        )
        raise ValueError(
            f"split folder {split_dir} lacks {len(missing)} class folders that other splits "
            f"have: {shown}; every split needs a folder of images for every class"
        )
    paths, labels = [], []
    for name in found:
        class_dir = join(split_dir, name)
        files = _entries(class_dir, folders=False)
        if not files:
            raise ValueError(f"class folder {class_dir} has no image files")
        paths += [join(class_dir, f) for f in files]
        labels += [classes.index(name)] * len(files)
    with concurrent.futures.ThreadPoolExecutor(_FILE_CHECK_THREADS) as pool:
        problems = list(pool.map(_file_problem, paths))
    bad = [(path, problem) for path, problem in zip(paths, problems, strict=True) if problem]
    if bad:
        report_bad_files(split_dir, bad, bad_files)
        kept = [i for i, problem in enumerate(problems) if problem is None]
        paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
        empty = sorted(set(found) - {classes[label] for label in labels})
        if empty:
            raise ValueError(f"class folders {empty} of {split_dir} have no readable images")
    return SplitFiles(np.array(paths, dtype=object), np.array(labels, np.int64))


def _file_problem(path: str) -> str | None:
    """None if the file starts like an image both loaders decode, else the problem."""
    try:
        with epath.Path(path).open("rb") as f:
            head = f.read(12)
    except OSError as error:
        return f"unreadable ({error})"
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (no JPEG, PNG, GIF, BMP, WebP or JPEG XL header)"


def report_bad_files(split_dir: str, bad: list[tuple[str, str]], bad_files: str) -> None:
    """Raises ValueError listing the bad files, or logs them when they are skipped."""
    listing = "; ".join(f"{path}: {problem}" for path, problem in bad[:_BAD_FILES_SHOWN])
    if len(bad) > _BAD_FILES_SHOWN:
        listing += f"; and {len(bad) - _BAD_FILES_SHOWN} more"
    if bad_files == "fail":
        raise ValueError(
            f"{len(bad)} bad image files in {split_dir}: {listing}. Remove them, or set "
            "dataset.bad_files='skip' to leave them out"
        )
    logging.warning("Skipping %d bad image files in %s: %s", len(bad), split_dir, listing)


def subfolders(path: str) -> list[str]:
    """Sorted names of the folders in `path`, hidden ones (".name") left out."""
    return _entries(path, folders=True)


def _entries(path: str, *, folders: bool) -> list[str]:
    """Sorted names of the folders (or the other entries) in `path`, hidden ones left out.

    A local folder is listed with `os.scandir`, which tells folders from files without a
    `stat` per entry (ImageNet's train split has 1.28 million files).
    """
    if os.path.isdir(path):  # a local folder (not gs://...)
        with os.scandir(path) as entries:
            found = [(e.name, e.is_dir()) for e in entries]
    else:
        found = [(p.name, p.is_dir()) for p in epath.Path(path).iterdir()]
    return sorted(name for name, is_dir in found if is_dir == folders and not name.startswith("."))


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)
