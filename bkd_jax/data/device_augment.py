"""Training augmentation of uint8 image batches on the devices, in plain `jax.numpy`.

The device-memory loader (`bkd_jax.training.inputs`) gathers a batch of uint8 images by
index and calls `train_images` inside one jitted function; every example gets its own
key, derived from (seed, epoch, example index), so the batch of a step is a pure function
of (seed, step) whatever the number of devices. The ops are the CIFAR recipes' own, small
enough that a library (dm-pix) would add a dependency without removing code:
  crop_flip: torchvision's RandomCrop(size, padding=4) then RandomHorizontalFlip, the
    mdistiller CIFAR recipe (the same as the tf.data pipeline's "crop_flip").
  cutout: DeVries & Taylor 2017 (github uoguelph-mlrg/Cutout, util/cutout.py): a square
    of side `size`, centred at a uniformly drawn pixel and clipped at the borders, zeroed
    in the normalised image.
  strong_images: MLKD's strong view, a crop_flip of its own then `randaugment`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from bkd_jax.data import randaugment

CROP_PADDING = 4  # torchvision RandomCrop(32, padding=4), mdistiller's CIFAR transform.


def example_keys(seed: int, epoch: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per example: `fold_in(fold_in(key(seed), epoch), index)`."""
    base = jax.random.key(seed)
    return jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(base, e), i))(epoch, indices)


def crop_flip(image: jax.Array, key: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
    """A random crop of the image zero-padded by `padding`, flipped with probability 1/2."""
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
    image = jax.lax.dynamic_slice(padded, (top, left, 0), image.shape)
    return jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)


def cutout(image: jax.Array, key: jax.Array, size: int) -> jax.Array:
    """`image` with a `size` x `size` square (clipped at the borders) set to zero."""
    height, width, _ = image.shape
    y_key, x_key = jax.random.split(key)
    y = jax.random.randint(y_key, (), 0, height)
    x = jax.random.randint(x_key, (), 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (
        (rows >= y - size // 2)
        & (rows < y + size // 2)
        & (cols >= x - size // 2)
        & (cols < x + size // 2)
    )
    return jnp.where(inside[..., None], jnp.zeros_like(image), image)


def normalise(
    images: jax.Array, white: int, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """uint8 pixels -> float32 (pixel / white - mean) / std, per channel."""
    scaled = images.astype(jnp.float32) / white
    return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def train_images(
    images: jax.Array,
    keys: jax.Array,
    *,
    augment: str,
    cutout_size: int,
    white: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> jax.Array:
    """A uint8 batch [B, H, W, 3] -> its augmented, normalised float32 training images."""
    crop_keys, cutout_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    if augment == "crop_flip":
        images = jax.vmap(crop_flip)(images, crop_keys)
    elif augment != "none":
        raise ValueError(f"augmentation {augment!r} runs on the host loader only")
    images = normalise(images, white, mean, std)
    if cutout_size:
        images = jax.vmap(lambda x, k: cutout(x, k, cutout_size))(images, cutout_keys)
    return images


def strong_images(
    images: jax.Array,
    keys: jax.Array,
    *,
    white: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> jax.Array:
    """MLKD's strong view of a uint8 batch: pad-crop-flip drawn apart from the weak view's
    (its keys are `keys` folded with 1), RandAugment(2, 10) and Cutout on the 0..255
    scale, then normalised as the weak view."""
    crop_keys, augment_keys = jax.vmap(
        lambda key: jax.random.split(jax.random.fold_in(key, 1)), out_axes=1
    )(keys)
    cropped = jax.vmap(crop_flip)(images, crop_keys)
    pixels = randaugment.randaugment(cropped.astype(jnp.float32) * (255 / white), augment_keys)
    return normalise(pixels, 255, mean, std)
