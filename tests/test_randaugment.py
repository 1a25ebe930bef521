"""MLKD's RandAugment operations against their definitions: PIL's, on fixed images.

Each operation of `bkd_jax.data.randaugment` must give exactly the pixels of the PIL call
that MLKD's mdistiller/dataset/cifar100.py makes, at several magnitudes across its range;
then the batch function: its shapes and dtypes, one draw per example key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax.data import randaugment as ra

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw, ImageEnhance, ImageOps  # noqa: E402


def _images():
    """A random image, one with a flat block and a narrow range, and a gradient (12 x 10)."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    narrow = rng.integers(60, 140, (12, 10, 3)).astype(np.uint8)
    narrow[2:6, 3:8] = [200, 40, 90]
    ramp = np.broadcast_to(np.arange(10, dtype=np.uint8)[None, :, None] * 25, (12, 10, 3))
    return [noisy, narrow, np.ascontiguousarray(ramp)]


def _affine(matrix):
    return lambda img, v: img.transform(img.size, Image.AFFINE, matrix(img, v))


PIL_OPS = {
    "auto_contrast": lambda img, v: ImageOps.autocontrast(img),
    "brightness": lambda img, v: ImageEnhance.Brightness(img).enhance(v),
    "color": lambda img, v: ImageEnhance.Color(img).enhance(v),
    "contrast": lambda img, v: ImageEnhance.Contrast(img).enhance(v),
    "equalize": lambda img, v: ImageOps.equalize(img),
    "identity": lambda img, v: img,
    "posterize": lambda img, v: ImageOps.posterize(img, max(1, int(v))),
    "rotate": lambda img, v: img.rotate(v),
    "sharpness": lambda img, v: ImageEnhance.Sharpness(img).enhance(v),
    "shear_x": _affine(lambda img, v: (1, v, 0, 0, 1, 0)),
    "shear_y": _affine(lambda img, v: (1, 0, 0, v, 1, 0)),
    "solarize": lambda img, v: ImageOps.solarize(img, v),
    "translate_x": _affine(lambda img, v: (1, 0, v * img.size[0], 0, 1, 0)),
    "translate_y": _affine(lambda img, v: (1, 0, 0, 0, 1, v * img.size[1])),
}


def test_the_op_list_is_mlkds():
    assert [name for name, _, _ in ra.OPS] == list(PIL_OPS)
    assert ra.OPS[7] == ("rotate", -30.0, 30.0) and ra.OPS[11] == ("solarize", 0.0, 256.0)


@pytest.mark.parametrize("name", list(PIL_OPS))
def test_each_op_gives_pils_pixels(name):
    low, high = next((lo, hi) for n, lo, hi in ra.OPS if n == name)
    op = jax.jit(getattr(ra, name))
    for img in _images():
        for v in np.linspace(low, high, 5)[:-1] + 0.013 * (high - low):
            want = np.asarray(PIL_OPS[name](Image.fromarray(img), float(v)))
            got = np.asarray(op(jnp.asarray(img, jnp.float32), jnp.float32(v)))
            if name == "auto_contrast":  # PIL's doubles: exact integers may drop by 1
                exact = _exact_auto_contrast(img)
                np.testing.assert_array_equal(got, exact)
                assert np.all((want == exact) | (want == exact - 1))
                continue
            np.testing.assert_array_equal(got, want, err_msg=f"{name} at {v}")


def _exact_auto_contrast(img):
    lo, hi = img.min(axis=(0, 1)).astype(int), img.max(axis=(0, 1)).astype(int)
    stretched = (img.astype(int) - lo) * 255 // np.maximum(hi - lo, 1)
    return np.where(hi > lo, stretched, img)


@pytest.mark.parametrize(("fraction", "x0", "y0"), [(0.3, 4.7, 2.2), (0.5, 0.4, 11.9), (0.0, 5, 5)])
def test_cutout_draws_pils_rectangle(fraction, x0, y0):
    img = _images()[0]
    pil = Image.fromarray(img)
    side = fraction * pil.size[0]
    if side > 0:  # CutoutAbs, with the corner drawn instead of sampled
        left, top = int(max(0, x0 - side / 2.0)), int(max(0, y0 - side / 2.0))
        right, bottom = min(pil.size[0], left + side), min(pil.size[1], top + side)
        ImageDraw.Draw(pil).rectangle((left, top, right, bottom), (125, 123, 114))
    got = ra.cutout(jnp.asarray(img, jnp.float32), fraction, jnp.float32(x0), jnp.float32(y0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pil))


def test_batches_keep_shape_and_dtype_and_draw_per_example():
    images = np.stack(_images() * 2)
    keys = jax.random.split(jax.random.key(0), len(images))
    fn = jax.jit(ra.randaugment)
    out = fn(jnp.asarray(images), keys)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    as_float = fn(jnp.asarray(images, jnp.float32), keys)
    assert as_float.dtype == jnp.float32
    np.testing.assert_array_equal(as_float, np.asarray(out, np.float32))
    np.testing.assert_array_equal(fn(jnp.asarray(images), keys), out)  # a function of the keys
    # Examples 0 and 3 are the same image under different keys: different views.
    assert np.any(np.asarray(out[0]) != np.asarray(out[3]))
    alone = fn(jnp.asarray(images[3:4]), keys[3:4])
    np.testing.assert_array_equal(alone[0], out[3])  # each example uses only its own key


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="RGB"):
        ra.randaugment(jnp.zeros((2, 8, 8)), jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="one key per image"):
        ra.randaugment(jnp.zeros((2, 8, 8, 3)), jax.random.split(jax.random.key(0), 3))
