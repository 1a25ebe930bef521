"""Loading a teacher (or initial student) checkpoint: the log line naming the directory and
step read, and the message for a checkpoint of another architecture."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bkd_jax import models
from bkd_jax.training import checkpointing, config_guard, loop

IMAGE_SHAPE = (8, 8, 3)


def _net(name: str) -> models.BlockNet:
    return models.get_model(name, 10)


def _resnet8_variables(seed: int) -> dict:
    net = _net("resnet8")
    return jax.tree.map(np.asarray, net.init(jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE))))


@pytest.fixture(scope="module")
def ce_workdir(tmp_path_factory):
    """A method=ce workdir of resnet8: the best top-1 at step 2, the last step 3."""
    workdir = tmp_path_factory.mktemp("ce_run")
    config_guard.check_or_write_config(workdir, {"student": "resnet8", "teacher": "resnet8"})
    ckpt = checkpointing.Checkpointer(workdir, save_interval_steps=1)
    for step, top1 in [(1, 0.3), (2, 0.9), (3, 0.5)]:
        v = _resnet8_variables(step)
        state = {"params": {"student": v["params"]}, "batch_stats": {"student": v["batch_stats"]}}
        ckpt.save(step, state, {}, metrics={"eval/top1": top1})
    ckpt.close()
    return workdir


def test_log_names_the_best_step_read_and_the_last(ce_workdir, caplog):
    with caplog.at_level("INFO"):
        variables = loop.load_model_variables(
            str(ce_workdir), models.get_model("resnet8", 10), IMAGE_SHAPE, "teacher"
        )
    want = _resnet8_variables(2)
    for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert (
        f"Loaded teacher resnet8 from {ce_workdir / 'checkpoints' / '2'} (the best checkpoint "
        "by top-1, step 2; the last is step 3)."
    ) in caplog.text
    # No orbax noise from reading another workdir: neither a read-only manager's warning
    # nor one about the step's metrics, which are read too.
    assert "read only" not in caplog.text and "could not be restored" not in caplog.text


def test_other_architecture_names_both_models(ce_workdir):
    with pytest.raises(ValueError) as info:
        loop.load_model_variables(
            str(ce_workdir), models.get_model("resnet20", 10), IMAGE_SHAPE, "teacher"
        )
    assert str(info.value) == (
        f"teacher checkpoint {ce_workdir} holds resnet8, config.teacher is resnet20"
    )


def test_converted_checkpoint_names_its_model(tmp_path, caplog):
    path = tmp_path / "converted"
    checkpointing.save_variables(
        path, _resnet8_variables(0), {"model": "resnet8", "source": "resnet8.pth"}
    )
    with pytest.raises(ValueError, match=r"holds resnet8, config.student is vgg8$"):
        loop.load_model_variables(str(path), _net("vgg8"), IMAGE_SHAPE, "student")
    with caplog.at_level("INFO"):
        loop.load_model_variables(str(path), _net("resnet8"), IMAGE_SHAPE, "teacher")
    assert f"Loaded teacher resnet8 from {path} (converted from resnet8.pth)." in caplog.text
