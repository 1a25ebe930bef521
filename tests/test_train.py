"""End-to-end tests of bkd_jax.training.loop: every method on 8 devices, the sharded step
against the single-device one, a real CIFAR-10 run, and the errors bad inputs get
before any compute.

JAX fixes its device count when it starts, so the 8-device tests run this file as a script
in one subprocess (`_eight_device_driver`) that trains every method in turn, and the tests
read what it left on disk.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bkd_jax import distillers, models, optim, steps
from bkd_jax.config_defaults import base_config
from bkd_jax.training import checkpointing, config_guard, loop, sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
# Examples per split of the mocked CIFAR-10: 2 steps of 16 per epoch (12 dropped); the
# evaluation pads 44 to 3 batches of 16 and must count 44.
MOCK_EXAMPLES = 44
MOCK_STEPS = 4  # two epochs: evaluations and checkpoints at steps 2 and 4
# Models each method evaluates besides the student (resnet8 has 3 blocks).
EVALUATED = {
    "ce": set(),
    "kd": {"teacher"},
    "dkd": {"teacher"},
    "blockkd": {"teacher", "stone1", "stone2", "stone3"},
    "blockkd_lite": {"teacher", "stone2", "stone3"},
}
# Training scalars that only each method logs.
METHOD_SCALARS = {
    "ce": {"train/ce"},
    "kd": {"train/kd"},
    "dkd": {"train/dkd", "train/warmup"},
    "blockkd": {"train/kd_stone1", "train/kd_stone3", "train/warmup"},
    "blockkd_lite": {"train/kd_stone2", "train/kd_stone3", "train/warmup"},
}


def mock_cifar10_config(method: str, teacher_checkpoint: str | None = None):
    """Tiny resnet8 runs on the mocked CIFAR-10: log every step, checkpoint every other."""
    config = base_config("cifar10", teacher="resnet8", student="resnet8", method=method)
    config.teacher_checkpoint = teacher_checkpoint
    config.num_train_steps = MOCK_STEPS
    config.global_batch_size = 16
    config.eval_batch_size = 16
    config.log_every_steps = 1
    config.checkpoint_every_steps = 2
    config.tensorboard = False
    return config


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def saved_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------
# The 8-device driver: runs in a subprocess, as `python tests/test_train.py OUT_DIR`.


def _save_synchronously() -> None:
    """Makes every checkpoint save wait for its files, and every checkpointer for orbax's
    clean-up.

    While tfds.testing.mock_data builds a dataset (each epoch, each evaluation) it redirects
    all file I/O of the process to a temporary folder, so an asynchronous checkpoint write
    still in flight would land there.
    """
    save = checkpointing.Checkpointer.save

    def save_and_wait(self, *args, **kwargs):
        saved = save(self, *args, **kwargs)
        self.wait_until_finished()
        return saved

    checkpointing.Checkpointer.save = save_and_wait

    # Likewise orbax's clean-up of partial saves, which it starts in the background when a
    # checkpointer opens its directory: it must not list the directory inside the redirect.
    # orbax offers no public way to wait for it; its own `save` waits through this method.
    init = checkpointing.Checkpointer.__init__

    def init_and_clean_up(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._manager._maybe_await_cleanup_tmp_directory()

    checkpointing.Checkpointer.__init__ = init_and_clean_up


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def _one_step_on(devices, distiller, optimizer, state, teacher_vars, batch, eval_batch) -> dict:
    """One train step then one eval step, jitted as the trainer does over a mesh of `devices`."""
    mesh = sharding.make_mesh(devices)
    repl = sharding.replicated(mesh)
    warmup = functools.partial(distillers.warmup_factor, steps_per_epoch=1, warmup_epochs=2)
    train_step = loop.jit_train_step(distiller, optimizer, warmup, mesh)
    eval_step = loop.jit_eval_step(distiller, mesh)
    global_batch = sharding.global_batch(batch, mesh)
    teacher_vars = jax.device_put(teacher_vars, repl)
    new_state, metrics = train_step(jax.device_put(state, repl), teacher_vars, global_batch)
    sums = eval_step(new_state, teacher_vars, sharding.global_batch(eval_batch, mesh))
    leaf = jax.tree.leaves(new_state.params)[0]
    return {
        "batch_shard_rows": [s.data.shape[0] for s in global_batch["image"].addressable_shards],
        "state_devices": len(leaf.sharding.device_set),
        "state_replicated": leaf.sharding.is_fully_replicated,
        "arrays": {
            **_flat({"metrics": metrics, "sums": sums}),
            **_flat({"state": jax.device_get(new_state)}),
        },
    }


def _compare_sharded_with_single_device(out: pathlib.Path, runs: pathlib.Path) -> None:
    """Block-KD's train and eval steps on all 8 devices and on the first alone, from the
    final state of the blockkd run (momentum included) with the ce run as teacher."""
    config = mock_cifar10_config("blockkd")
    student = models.get_model("resnet8", 10)
    teacher_vars, _ = checkpointing.load_variables(runs / "ce")
    distiller = distillers.make_distiller(config.distill, student, student, (1, 32, 32, 3))
    optimizer = optim.make_optimizer(config.optim, steps_per_epoch=1)
    abstract = jax.eval_shape(
        functools.partial(steps.create_train_state, distiller, optimizer),
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
    )
    on_host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    checkpointer = checkpointing.Checkpointer(
        runs / "blockkd", save_interval_steps=1, best_metric=loop.BEST_METRIC
    )
    state, _ = checkpointer.restore(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_host), abstract)
    )
    checkpointer.close()
    state = jax.device_get(state)
    assert int(state.step) == MOCK_STEPS
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 16).astype(np.int32),
    }
    eval_batch = {**batch, "mask": np.arange(16) < 13}
    for name, devices in (("sharded", jax.devices()), ("single", jax.devices()[:1])):
        result = _one_step_on(devices, distiller, optimizer, state, teacher_vars, batch, eval_batch)
        np.savez(out / f"{name}.npz", **result.pop("arrays"))
        (out / f"{name}.json").write_text(json.dumps(result))


def _eight_device_driver(out: pathlib.Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    _save_synchronously()
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
        config = mock_cifar10_config("ce")
        config.global_batch_size = 12
        try:
            loop.train_and_evaluate(config, str(out / "batch12"))
        except ValueError as e:
            (out / "batch12_error.txt").write_text(str(e))
        else:
            (out / "batch12_error.txt").write_text("no error")
        for method in EVALUATED:
            teacher = None if method == "ce" else str(out / "ce")
            loop.train_and_evaluate(mock_cifar10_config(method, teacher), str(out / method))
    (out / "steps").mkdir()
    _compare_sharded_with_single_device(out / "steps", out)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> pathlib.Path:
    """The driver's output folder: a workdir per method, the step comparison, the error."""
    out = tmp_path_factory.mktemp("eight_devices")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
        # Optimisation level 0 compiles about 4x faster on CPU (the initialisers' PRNG code
        # dominates); the steps stay exact, only slower to run, and these runs are short.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    }
    result = subprocess.run(
        [sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return out


@pytest.mark.parametrize("method", list(EVALUATED))
def test_every_method_trains_evaluates_and_checkpoints_on_eight_devices(eight_devices, method):
    workdir = eight_devices / method
    results = json.loads((workdir / loop.RESULTS_FILE).read_text())
    assert results["steps"] == results["total_steps"] == MOCK_STEPS
    assert results["last"]["step"] == MOCK_STEPS
    models_evaluated = {k.split("/")[1] for k in results["last"] if k.endswith("/top1")}
    assert models_evaluated == {"student"} | EVALUATED[method]
    assert results["last"]["eval/count"] == MOCK_EXAMPLES

    records = read_jsonl(workdir / "metrics.jsonl")
    train_records = [r for r in records if "train/loss" in r]
    eval_records = [r for r in records if "eval/count" in r]
    assert [r["step"] for r in train_records] == list(range(1, MOCK_STEPS + 1))
    assert all(np.isfinite(r["train/loss"]) for r in train_records)
    assert METHOD_SCALARS[method] <= train_records[0].keys()
    assert [(r["step"], r["eval/count"]) for r in eval_records] == [
        (2, MOCK_EXAMPLES),
        (4, MOCK_EXAMPLES),
    ]
    last_eval = {k: v for k, v in results["last"].items() if k.startswith("eval/")}
    assert eval_records[-1] == {"step": MOCK_STEPS, **last_eval}

    assert saved_steps(workdir / checkpointing.LATEST_DIR) == [2, 4]
    assert checkpointing.load_variables(workdir)[1]["step"] == results["best"]["step"]
    saved_config = json.loads((workdir / config_guard.CONFIG_FILE).read_text())
    assert saved_config["distill"]["method"] == method


def test_students_are_distilled_from_the_given_teacher(eight_devices):
    """Each distilling run evaluates the ce run's best checkpoint as its teacher."""
    ce_best = json.loads((eight_devices / "ce" / loop.RESULTS_FILE).read_text())["best"]
    for method in ("kd", "dkd", "blockkd", "blockkd_lite"):
        last = json.loads((eight_devices / method / loop.RESULTS_FILE).read_text())["last"]
        assert last["eval/teacher/top1"] == ce_best["eval/student/top1"], method
        assert last["eval/teacher/top5"] == ce_best["eval/student/top5"], method


def test_sharded_step_equals_single_device_step(eight_devices):
    layouts = {
        name: json.loads((eight_devices / "steps" / f"{name}.json").read_text())
        for name in ("sharded", "single")
    }
    assert layouts["sharded"] == {
        "batch_shard_rows": [2] * 8,
        "state_devices": 8,
        "state_replicated": True,
    }
    assert layouts["single"]["batch_shard_rows"] == [16]
    sharded = np.load(eight_devices / "steps" / "sharded.npz")
    single = np.load(eight_devices / "steps" / "single.npz")
    assert sorted(sharded.files) == sorted(single.files)
    assert {"['metrics']['loss']", "['sums']['count']", "['sums']['stone1/top1']"} <= set(
        sharded.files
    )
    assert float(single["['sums']['count']"]) == 13
    for name in sharded.files:
        np.testing.assert_allclose(sharded[name], single[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_global_batch_must_split_over_the_devices(eight_devices):
    message = (eight_devices / "batch12_error.txt").read_text()
    assert "config.global_batch_size 12 does not divide by the 8 devices" in message
    assert not (eight_devices / "batch12").exists()


# ---------------------------------------------------------------------------------------
# Real data: CIFAR-10 JPEGs from ../shared/data.

CIFAR10_PER_CLASS = {"train": 300, "test": 100}  # 3000 / 1000 images of all 10 classes


def extract_cifar10_subset(archive: pathlib.Path, root: pathlib.Path) -> None:
    """The first CIFAR10_PER_CLASS[split] images of each class, as split/class/NNNN.jpg."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 3
                and parts[0] in CIFAR10_PER_CLASS
                and int(pathlib.Path(parts[2]).stem) < CIFAR10_PER_CLASS[parts[0]]
            ):
                tar.extract(member, root, filter="data")


def test_learns_real_cifar10_jpegs(shared_data, tmp_path):
    data = tmp_path / "cifar10"
    extract_cifar10_subset(shared_data / "cifar10-jpeg.tar.gz", data)
    config = base_config("image_folder", teacher="resnet8", student="resnet8", method="ce")
    config.dataset.data_dir = str(data)
    config.dataset.update(
        image_size=32,
        augment="none",  # four epochs are too few for augmentation to pay
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )
    config.num_train_steps = 200  # 4.3 epochs of 46 steps of 64
    config.optim.learning_rate = 0.2
    config.optim.decay_epochs = (3.5,)
    config.eval_every_epochs = 100  # once, at the end
    config.tensorboard = False

    results = loop.train_and_evaluate(config, str(tmp_path / "run"))

    last = results["last"]
    assert last["eval/count"] == 1000
    assert last["eval/student/top1"] > 0.3, last  # chance is 0.1; measured 0.42 to 0.44


# ---------------------------------------------------------------------------------------
# Bad inputs: each fails with its own message before anything is computed or written.


@pytest.fixture
def no_compute(monkeypatch):
    """Makes creating the train state (the first computation of a run) fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the run started computing before rejecting its config")

    monkeypatch.setattr(steps, "create_train_state", fail)


@pytest.fixture(scope="module")
def resnet8_checkpoint(tmp_path_factory) -> pathlib.Path:
    """Standalone resnet8 variables (zeros of the right shapes) for 10 classes."""
    net = models.get_model("resnet8", 10)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    path = tmp_path_factory.mktemp("teachers") / "resnet8"
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    checkpointing.save_variables(path, variables, {"model": "resnet8"})
    return path


def digits_config(method: str = "ce", teacher: str = "resnet8", dataset: str = "digits"):
    config = base_config(dataset, teacher=teacher, student="resnet8", method=method)
    config.num_train_steps = 1
    config.tensorboard = False
    return config


def _unknown_dataset(tmp_path, teacher):
    config = digits_config()
    config.dataset.name = "cifar1000"
    return config, "unknown dataset 'cifar1000'; known: cifar100, cifar10"


def _dataset_renamed_in_code(tmp_path, teacher):
    config = digits_config()
    config.dataset.name = "image_folder"  # digits' fields, not image_folder's
    return config, r"config.dataset names 'image_folder' without its fields .*bad_files"


def _unknown_model(tmp_path, teacher):
    config = digits_config()
    config.student = "resnet9"
    return config, "unknown model 'resnet9'; known: .*resnet8"


def _unknown_method(tmp_path, teacher):
    config = digits_config()
    config.distill.method = "no_such"
    return config, "unknown distillation method 'no_such'; known: ce, kd, dkd, "


def _tfds_data_missing(tmp_path, teacher):
    config = digits_config(dataset="cifar10")
    config.dataset.data_dir = str(tmp_path / "tfds")
    return config, (
        f"TFDS data set 'cifar10' is not prepared in data_dir {tmp_path / 'tfds'}.*"
        f"`tfds build cifar10 --data_dir={tmp_path / 'tfds'}`"
    )


def _teacher_checkpoint_unset(tmp_path, teacher):
    config = digits_config("kd")
    return config, "method 'kd' distils from a teacher: set config.teacher_checkpoint"


def _teacher_checkpoint_missing(tmp_path, teacher):
    config = digits_config("kd")
    config.teacher_checkpoint = str(tmp_path / "no_teacher")
    return config, f"teacher checkpoint {tmp_path / 'no_teacher'}: .* does not exist"


def _teacher_checkpoint_of_another_model(tmp_path, teacher):
    config = digits_config("kd", teacher="resnet20")
    config.teacher_checkpoint = str(teacher)
    return config, f"teacher checkpoint {teacher} holds resnet8, config.teacher is resnet20"


def _bad_distillation_option(tmp_path, teacher):
    config = digits_config("blockkd")
    config.distill.blockkd.stones = (4,)
    config.teacher_checkpoint = str(teacher)
    return config, r"distill.blockkd.stones=\(4,\) must be distinct indices in 1..3"


@pytest.mark.parametrize(
    "bad_config",
    [
        _unknown_dataset,
        _dataset_renamed_in_code,
        _unknown_model,
        _unknown_method,
        _tfds_data_missing,
        _teacher_checkpoint_unset,
        _teacher_checkpoint_missing,
        _teacher_checkpoint_of_another_model,
        _bad_distillation_option,
    ],
)
def test_bad_config_is_rejected_before_compute_and_writes_nothing(
    bad_config, tmp_path, resnet8_checkpoint, no_compute
):
    config, message = bad_config(tmp_path, resnet8_checkpoint)
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_workdir_of_another_config_is_refused_and_kept(tmp_path, no_compute):
    """A workdir with a checkpoint and the config of another run is neither used nor touched."""
    workdir = tmp_path / "run"
    first = digits_config()
    config_guard.check_or_write_config(workdir, first.to_dict(), ignore=loop.COSMETIC_KEYS)
    checkpointer = checkpointing.Checkpointer(workdir, save_interval_steps=1)
    checkpointer.save(3, {"w": np.ones(2, np.float32)}, {"history": []})
    checkpointer.close()
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    config_text = (workdir / config_guard.CONFIG_FILE).read_text()

    second = digits_config()
    second.seed = 1
    second.log_every_steps = 7  # cosmetic: not reported
    with pytest.raises(ValueError, match="differs from the one this workdir") as error:
        loop.train_and_evaluate(second, str(workdir))

    assert "seed: 0 -> 1" in str(error.value)
    assert "log_every_steps" not in str(error.value)
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert (workdir / config_guard.CONFIG_FILE).read_text() == config_text


if __name__ == "__main__":
    _eight_device_driver(pathlib.Path(sys.argv[1]))
