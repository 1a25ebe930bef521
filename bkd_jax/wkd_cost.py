r"""WKD's inter-category cost from a teacher's features: 1 - linear CKA between classes.

  python -m bkd_jax.wkd_cost --teacher=runs/teacher --config=configs/cifar100.py:... \
      --output=cost.npy [--images_per_class=N]

writes the (classes, classes) float32 .npy that WKD-L (and Block-KD's distance "wkd_l")
read through the knob `cost_matrix`. It computes what the authors' released CIFAR-100
costs are made of (github JiamingLv/WKD, generate_cost_matrix.sh, "For CIFAR-100"):
- tools/generate_class_proto.py with `--feature_type feature`: the teacher in eval mode
  over the training split at the test transform (no augmentation; lines 131-141), the
  last map of mdistiller's `feats` (the last stage's output, unpooled; lines 47-53), each
  class's maps stacked and every spatial position made a row: (images * H * W, channels)
  per class (lines 58-68). All images of each class are used; classes must hold equally
  many, which CIFAR-100's do. Here every class gives its first `images_per_class` in split
  order (default: as many as the smallest class has).
- tools/generate_cost_matrix.py: cost[i, j] = 1 - linear CKA of class i's and class j's
  row matrices, rows paired by position, columns centred (`linear_CKA_precenter`,
  lines 52-67), computed for i <= j and mirrored (lines 137-141), saved unsharpened
  (line 147); WKD.py applies COST_MATRIX_SHARPEN when it loads the file, as `cost_matrix`
  here does.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited",
ICML 2019, eq. 4 in its feature-space form): for column-centred X (n, p), Y (n, q),
CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F); invariant to orthogonal transforms and
isotropic scaling of either matrix.

The data set is read whole as arrays (`bkd_jax.data.arrays`: digits, npz, image folders,
TFDS in the ArrayRecord format); the features are held in host memory, for resnet32x4 on
CIFAR-100 50,000 x 8 x 8 x 256 float32 values (3.3 GB).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bkd_jax import models
from bkd_jax.data import arrays, device_augment
from bkd_jax.distillers.feature_modules import feats

# generate_class_proto.py: --batch-size default 512 (line 85); any size gives the same maps.
BATCH_SIZE = 512


def define_flags() -> None:
    """The command line's flags; only when run as a program, so importing defines none."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file naming the teacher model and the data set.", lock_config=True
    )
    flags.DEFINE_string(
        "teacher", None, "Teacher checkpoint: a training workdir or a converted-variables dir."
    )
    flags.DEFINE_string("output", None, "Where to write the (classes, classes) .npy.")
    flags.DEFINE_integer(
        "images_per_class", 0, "First images of each class to use; 0 = as many as the smallest has."
    )


def class_indices(labels: np.ndarray, num_classes: int, images_per_class: int) -> np.ndarray:
    """(classes, n) split positions: each class's first n examples in split order.

    n is `images_per_class`, or with 0 the smallest class's count.
    """
    if images_per_class < 0:
        raise ValueError(f"images_per_class must be >= 0, got {images_per_class}")
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    smallest = min(len(m) for m in members)
    if smallest == 0:
        raise ValueError("every class needs an image in the training split; one has none")
    n = images_per_class or smallest
    if n > smallest:
        raise ValueError(f"images_per_class {n} exceeds the smallest class's {smallest} images")
    return np.stack([m[:n] for m in members])


def linear_cka_cost(features: jax.Array) -> jax.Array:
    """(classes, classes) 1 - linear CKA of every pair of (classes, rows, dim) features.

    Rows of two classes are paired by position; CKA is computed for i <= j and mirrored,
    so the cost is exactly symmetric. float32.
    """
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"features must be (classes, rows >= 2, dim), got {features.shape}")
    x = jnp.asarray(features, jnp.float32)
    x = x - jnp.mean(x, axis=1, keepdims=True)
    self_norms = jax.vmap(lambda a: jnp.linalg.norm(a.T @ a))(x)  # ||X^T X||_F

    def hsic_row(a: jax.Array) -> jax.Array:
        cross = jnp.einsum("rp,crq->cpq", a, x)  # X_c^T A for every class c
        return jnp.sum(cross**2, axis=(1, 2))

    hsic = jax.lax.map(hsic_row, x)
    cka = hsic / (self_norms[:, None] * self_norms[None, :])
    upper = jnp.triu(1.0 - cka)
    return upper + jnp.triu(upper, 1).T


def feature_fn(net: models.BlockNet, ds_config: ml_collections.ConfigDict, white: int):
    """Jitted `(variables, uint8 images) -> (N, H * W, C)` last feature maps, eval mode."""

    @jax.jit
    def apply(variables, images: jax.Array) -> jax.Array:
        x = device_augment.normalise(images, white, ds_config.mean, ds_config.std)
        last = feats(net.taps(variables, x)[1])[-1]
        return last.reshape(last.shape[0], -1, last.shape[-1]).astype(jnp.float32)

    return apply


def class_features(apply, variables, images: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(classes, n * H * W, C) rows of the images at `index` (classes, n), in batches."""
    flat = index.reshape(-1)
    out = []
    for start in range(0, len(flat), BATCH_SIZE):
        chunk = flat[start : start + BATCH_SIZE]
        padded = np.pad(chunk, (0, BATCH_SIZE - len(chunk)))  # one compiled shape
        out.append(np.asarray(apply(variables, images[padded]))[: len(chunk)])
        print(f"features: {start + len(chunk)}/{len(flat)} images", flush=True)
    maps = np.concatenate(out)
    return maps.reshape(index.shape[0], -1, maps.shape[-1])


def save_npy(path: str, array: np.ndarray) -> None:
    """Writes `array` to `path` whole or not at all: a temporary file, then one rename."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as f:
            np.save(f, array)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def compute(config: ml_collections.ConfigDict, teacher: str, images_per_class: int) -> np.ndarray:
    """The cost matrix of `config.teacher` loaded from `teacher`, on `config.dataset`."""
    from bkd_jax.training.loop import load_model_variables  # the trainer's checks

    source = arrays.open_source(config.dataset)
    split = config.dataset.train_split
    data = source.load(split, source.count(split))
    index = class_indices(data.labels, source.num_classes, images_per_class)
    net = models.get_model(config.teacher, source.num_classes)
    variables = load_model_variables(teacher, net, data.images.shape[1:], "teacher")
    print(f"{config.teacher}: {source.num_classes} classes x {index.shape[1]} images", flush=True)
    features = class_features(
        feature_fn(net, config.dataset, source.white), variables, data.images, index
    )
    print(f"linear CKA of {features.shape[0]} classes, {features.shape[1:]} each", flush=True)
    return np.asarray(linear_cka_cost(features), np.float32)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    for name in ("config", "teacher", "output"):
        if not args[name].value:
            raise app.UsageError(f"--{name} is required")
    output = args.output
    if not output.endswith(".npy"):
        raise app.UsageError(f"--output must end in .npy, got {output!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise app.UsageError(f"--output's folder does not exist: {output!r}")
    try:
        cost = compute(args.config, args.teacher, args.images_per_class)
    except (ValueError, arrays.NeedsHostLoader) as error:
        sys.exit(f"error: {error}")
    save_npy(output, cost)
    off_diagonal = cost[~np.eye(len(cost), dtype=bool)]
    print(
        f"wrote {output}: {cost.shape}, off-diagonal cost "
        f"{off_diagonal.min():.4f}..{off_diagonal.max():.4f}",
        flush=True,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
