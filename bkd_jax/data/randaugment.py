"""MLKD's strong view: RandAugment(2, 10) with its own 14 operations, then Cutout.

As github Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/dataset/cifar100.py
(`RandAugment`, `augment_list`, `Cutout`, the FixMatch variant): per image, two operations
drawn with replacement from the list below, each at a magnitude drawn uniformly from its
range (the "10" of RandAugment(2, 10) is unused there), then a Cutout square of side
u * width, u ~ U[0, 0.5), filled with (125, 123, 114). The operations are PIL's, written
here as jnp functions of one HWC image on the 0..255 scale, each rounding as PIL rounds
to 8 bits, so that `randaugment` runs on device over a batch:

  AutoContrast, Brightness [0.05, 0.95], Color [0.05, 0.95], Contrast [0.05, 0.95],
  Equalize, Identity, Posterize [4, 8] bits, Rotate [-30, 30] degrees,
  Sharpness [0.05, 0.95], ShearX and ShearY [-0.3, 0.3], Solarize [0, 256],
  TranslateX and TranslateY [-0.3, 0.3] of the size.

Geometric operations sample with nearest neighbours and fill with black, as PIL's
`Image.transform` and `rotate` with their defaults. A hand-written port rather than a
library: no JAX image library has these PIL operations with PIL's rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# (name, low, high) in augment_list()'s order.
OPS = (
    ("auto_contrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
NUM_OPS = 2  # RandAugment(2, 10)
CUTOUT_MAX = 0.5  # Cutout's side, a fraction of the width: random.random() * 0.5
CUTOUT_FILL = (125.0, 123.0, 114.0)


def _to_uint8(x: jax.Array) -> jax.Array:
    """PIL's float-to-8-bit step in blends: clip to [0, 255], then truncate."""
    return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _grey(img: jax.Array) -> jax.Array:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2^15) >> 16, as (H, W, 1)."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return jnp.floor((19595 * r + 38470 * g + 7471 * b + 32768) / 65536)[..., None]


def _blend(degenerate: jax.Array, img: jax.Array, factor: jax.Array) -> jax.Array:
    """`ImageEnhance`'s `Image.blend(degenerate, img, factor)`."""
    return _to_uint8(degenerate + factor * (img - degenerate))


def brightness(img: jax.Array, v: jax.Array) -> jax.Array:
    return _blend(jnp.zeros_like(img), img, v)


def color(img: jax.Array, v: jax.Array) -> jax.Array:
    return _blend(jnp.broadcast_to(_grey(img), img.shape), img, v)


def contrast(img: jax.Array, v: jax.Array) -> jax.Array:
    mean = jnp.floor(jnp.mean(_grey(img)) + 0.5)
    return _blend(jnp.full_like(img, mean), img, v)


def sharpness(img: jax.Array, v: jax.Array) -> jax.Array:
    """Blend with PIL's SMOOTH filter ((1 1 1; 1 5 1; 1 1 1) / 13), borders unfiltered."""
    h, w, _ = img.shape
    padded = jnp.pad(img, ((1, 1), (1, 1), (0, 0)))
    window = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3))
    smooth = jnp.floor(jnp.clip((window + 4 * img) / 13 + 0.5, 0.0, 255.0))
    inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return _blend(jnp.where(inner, smooth, img), img, v)


def auto_contrast(img: jax.Array, v: jax.Array) -> jax.Array:
    """Per channel, [min, max] stretched to [0, 255], truncated; flat channels kept.

    The stretch is exact here, floor(255 (x - min) / (max - min)); PIL computes
    x * scale + offset in doubles, whose rounding truncates a few exact integers to one
    level below (at most 1 of 255, on a few pixels).
    """
    del v
    lo, hi = jnp.min(img, axis=(0, 1)), jnp.max(img, axis=(0, 1))
    stretched = jnp.floor((img - lo) * 255.0 / jnp.maximum(hi - lo, 1.0))
    return jnp.where(hi > lo, stretched, img)


def _equalize_channel(x: jax.Array) -> jax.Array:
    """PIL's `ImageOps.equalize` lookup for one channel of integer values 0..255."""
    histogram = jnp.zeros(256, jnp.int32).at[x.astype(jnp.int32).ravel()].add(1)
    last = histogram[jnp.max(jnp.nonzero(histogram, size=256, fill_value=0)[0])]
    step = (x.size - last) // 255
    before = jnp.cumsum(histogram) - histogram
    lut = jnp.minimum((step // 2 + before) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[x.astype(jnp.int32)], x).astype(x.dtype)


def equalize(img: jax.Array, v: jax.Array) -> jax.Array:
    del v
    return jnp.stack([_equalize_channel(img[..., c]) for c in range(img.shape[-1])], axis=-1)


def identity(img: jax.Array, v: jax.Array) -> jax.Array:
    del v
    return img


def posterize(img: jax.Array, v: jax.Array) -> jax.Array:
    """Keep the top int(v) bits (v >= 1)."""
    drop = 2.0 ** (8 - jnp.maximum(1.0, jnp.floor(v)))
    return jnp.floor(img / drop) * drop


def solarize(img: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.where(img < v, img, 255.0 - img)


def _affine(img: jax.Array, matrix: jax.Array) -> jax.Array:
    """PIL's AFFINE transform, NEAREST: output (x, y) reads input
    (a x' + b y' + c, d x' + e y' + f) at pixel centres x' = x + 0.5, y' = y + 0.5,
    truncated; outside the image black."""
    h, w, _ = img.shape
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    y, x = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    xs, ys = a * x + b * y + c, d * x + e * y + f
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    xi = jnp.clip(jnp.floor(xs), 0, w - 1).astype(jnp.int32)
    yi = jnp.clip(jnp.floor(ys), 0, h - 1).astype(jnp.int32)
    return jnp.where(inside[..., None], img[yi, xi], 0.0)


def rotate(img: jax.Array, v: jax.Array) -> jax.Array:
    """`Image.rotate(v)`: v degrees counter-clockwise about the centre."""
    h, w, _ = img.shape
    angle = -jnp.deg2rad(v)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return _affine(img, jnp.stack([cos, sin, c, -sin, cos, f]))


def shear_x(img: jax.Array, v: jax.Array) -> jax.Array:
    zero, one = jnp.zeros_like(v), jnp.ones_like(v)
    return _affine(img, jnp.stack([one, v, zero, zero, one, zero]))


def shear_y(img: jax.Array, v: jax.Array) -> jax.Array:
    zero, one = jnp.zeros_like(v), jnp.ones_like(v)
    return _affine(img, jnp.stack([one, zero, zero, v, one, zero]))


def translate_x(img: jax.Array, v: jax.Array) -> jax.Array:
    zero, one = jnp.zeros_like(v), jnp.ones_like(v)
    return _affine(img, jnp.stack([one, zero, v * img.shape[1], zero, one, zero]))


def translate_y(img: jax.Array, v: jax.Array) -> jax.Array:
    zero, one = jnp.zeros_like(v), jnp.ones_like(v)
    return _affine(img, jnp.stack([one, zero, zero, zero, one, v * img.shape[0]]))


_FUNCTIONS = {
    "auto_contrast": auto_contrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "identity": identity,
    "posterize": posterize, "rotate": rotate, "sharpness": sharpness, "shear_x": shear_x,
    "shear_y": shear_y, "solarize": solarize, "translate_x": translate_x,
    "translate_y": translate_y,
}  # fmt: skip


def cutout(img: jax.Array, fraction: jax.Array, x0: jax.Array, y0: jax.Array) -> jax.Array:
    """CutoutAbs of side fraction * width from the corner (int(max(0, x0 - side / 2)), ...):
    the rectangle up to min(size, corner + side), both ends included, as ImageDraw draws
    it; nothing for a side of 0."""
    h, w, _ = img.shape
    side = fraction * w
    left = jnp.floor(jnp.maximum(0.0, x0 - side / 2))
    top = jnp.floor(jnp.maximum(0.0, y0 - side / 2))
    right, bottom = jnp.minimum(w, left + side), jnp.minimum(h, top + side)
    y, x = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    box = (x >= left) & (x <= jnp.floor(right)) & (y >= top) & (y <= jnp.floor(bottom))
    box &= side > 0
    return jnp.where(box[..., None], jnp.asarray(CUTOUT_FILL, img.dtype), img)


def _augment_one(img: jax.Array, key: jax.Array) -> jax.Array:
    op_key, value_key, cut_key, corner_key = jax.random.split(key, 4)
    ops = jax.random.randint(op_key, (NUM_OPS,), 0, len(OPS))
    lows = jnp.asarray([low for _, low, _ in OPS])
    highs = jnp.asarray([high for _, _, high in OPS])
    u = jax.random.uniform(value_key, (NUM_OPS,))
    branches = [_FUNCTIONS[name] for name, _, _ in OPS]
    for i in range(NUM_OPS):
        v = lows[ops[i]] + (highs[ops[i]] - lows[ops[i]]) * u[i]
        img = jax.lax.switch(ops[i], branches, img, v)
    h, w, _ = img.shape
    corner = jax.random.uniform(corner_key, (2,)) * jnp.asarray([w, h], jnp.float32)
    fraction = jax.random.uniform(cut_key) * CUTOUT_MAX
    return cutout(img, fraction, corner[0], corner[1])


def randaugment(images: jax.Array, keys: jax.Array) -> jax.Array:
    """MLKD's strong view of a batch: RandAugment(2, 10) and Cutout, per example.

    Args:
      images: (N, H, W, 3) RGB, uint8 or float on the 0..255 scale (before any
        normalisation, as PIL sees them).
      keys: (N,) typed PRNG keys, one per example.

    Returns:
      The augmented images, of the input's shape and dtype.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"randaugment: images must be (N, H, W, 3) RGB, got {images.shape}.")
    if keys.shape != images.shape[:1]:
        raise ValueError(
            f"randaugment: one key per image needed, got {keys.shape} keys for {images.shape[0]}."
        )
    return jax.vmap(_augment_one)(images.astype(jnp.float32), keys).astype(images.dtype)
