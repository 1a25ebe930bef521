"""Tests for bkd_jax.training.checkpointing: round trips, retention, integrity records and
the fall-back past a damaged step, teacher weights."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from bkd_jax.training import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[1]


def _state(seed: int) -> dict:
    """A small train state whose every array depends on `seed`."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "params": {
            "student": {"block1": {"kernel": jax.random.normal(k1, (3, 4))}},
            "teacher": {"head": {"bias": jnp.full((2,), float(seed))}},
        },
        "batch_stats": {"student": {"block1": {"mean": jnp.arange(4.0) + seed}}},
        "opt": {"momentum": (jax.random.uniform(k2, (4,)), ())},
        "rng": jax.random.key(100 + seed),
        "step": seed,
    }


def _assert_states_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert got["step"] == want["step"] and isinstance(got["step"], int)
    assert got["rng"].dtype == want["rng"].dtype
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(want["rng"]))
    floats = ("params", "batch_stats", "opt")
    got_leaves, want_leaves = (jax.tree.leaves([s[k] for k in floats]) for s in (got, want))
    assert len(got_leaves) == len(want_leaves) == 4
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _saved_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_round_trip_restores_state_and_extra(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=10)
    assert ckpt.latest_step() is None
    assert ckpt.restore(_state(0)) is None
    extra = {"epoch": 2, "data_position": 1234, "best": 0.25, "note": "x"}
    assert ckpt.save(7, _state(7), extra, force=True)
    ckpt.close()

    reopened = checkpointing.Checkpointer(tmp_path, save_interval_steps=10)
    assert reopened.latest_step() == 7
    state, got_extra = reopened.restore(jax.eval_shape(lambda: _state(0)) | {"step": 0})
    _assert_states_equal(state, _state(7))
    assert got_extra == extra
    reopened.close()


def test_schedule_is_respected_and_force_saves_once(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=10)
    saved = [ckpt.save(step, _state(step), {}) for step in range(1, 8)]
    assert saved == [False, False, True, False, False, True, False]
    assert ckpt.save(7, _state(7), {}, force=True)
    assert not ckpt.save(7, _state(7), {}, force=True)  # never twice for one step
    ckpt.close()
    assert _saved_steps(tmp_path / "checkpoints") == [3, 6, 7]


def test_keeps_latest_few_and_best_even_when_older(tmp_path):
    top1 = {1: 0.1, 2: 0.5, 3: 0.3, 4: 0.2, 5: 0.4}
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2)
    for step, value in top1.items():
        ckpt.save(step, _state(step), {"step": step}, metrics={"eval/top1": value})
    assert ckpt.best_value == 0.5
    assert ckpt.latest_step() == 5
    ckpt.close()
    assert _saved_steps(tmp_path / "checkpoints") == [2, 4, 5]  # the latest two and the best

    # The best value survives a restart: a worse metric later does not replace it.
    reopened = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, max_to_keep=2)
    assert reopened.best_value == 0.5
    assert not reopened.save(6, _state(6), {}, metrics={"eval/top1": 0.45})
    assert reopened.save(7, _state(7), {}, metrics={"eval/top1": 0.6})
    reopened.close()
    assert _saved_steps(tmp_path / "checkpoints") == [5, 7]  # step 2 is no longer the best
    assert checkpointing.load_variables(tmp_path)[1]["step"] == 7


def test_restore_takes_the_newest_step_saved_on_schedule_or_as_best(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=10)
    ckpt.save(10, _state(10), {"at": 10})
    assert not ckpt.save(11, _state(11), {"at": 11})
    ckpt.save(13, _state(13), {"at": 13}, metrics={"eval/top1": 0.9})  # off schedule: best
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 13
    state, extra = ckpt.restore(_state(0))
    _assert_states_equal(state, _state(13))
    assert extra == {"at": 13}
    ckpt.close()


def test_lower_is_better_mode(tmp_path):
    ckpt = checkpointing.Checkpointer(
        tmp_path, save_interval_steps=100, best_metric="eval/loss", best_mode="min"
    )
    for step, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
        ckpt.save(step, _state(step), {}, metrics={"eval/loss": loss})
    assert ckpt.best_value == 1.0
    ckpt.close()
    assert _saved_steps(tmp_path / "checkpoints") == [1, 2]  # step 3 was not due nor better
    assert checkpointing.load_variables(tmp_path)[1]["step"] == 2


def test_an_equal_value_later_does_not_replace_the_best(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1)
    for step, value in [(1, 0.5), (2, 0.5), (3, 0.4)]:
        ckpt.save(step, _state(step), {}, metrics={"eval/top1": value})
    ckpt.close()
    assert _saved_steps(tmp_path / "checkpoints") == [1, 3]
    assert checkpointing.load_variables(tmp_path)[1]["step"] == 1


def test_save_and_load_variables_round_trip(tmp_path):
    kernel = np.arange(24.0, dtype=np.float32).reshape(2, 3, 4)
    variables = {
        "params": {"block1": {"conv1": {"kernel": kernel}}},
        "batch_stats": {"block1": {"bn1": {"mean": np.ones(4, np.float32)}}},
    }
    metadata = {"source": "torch", "arch": "resnet32x4", "top1": 79.4}
    checkpointing.save_variables(tmp_path / "teacher", variables, metadata)
    got, got_metadata = checkpointing.load_variables(tmp_path / "teacher")
    assert got_metadata == metadata
    assert jax.tree.structure(got) == jax.tree.structure(variables)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(variables), strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="already exists"):
        checkpointing.save_variables(tmp_path / "teacher", variables, metadata)


def test_load_variables_from_workdir_picks_best_student(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1)
    for step, value in [(1, 0.2), (2, 0.7), (3, 0.4)]:
        ckpt.save(step, _state(step), {"epoch": step}, metrics={"eval/top1": value})
    ckpt.close()
    variables, metadata = checkpointing.load_variables(tmp_path)
    want = _state(2)
    assert metadata == {
        "checkpoint": "best",
        "step": 2,
        "directory": str(tmp_path / "checkpoints" / "2"),
        "extra": {"epoch": 2},
    }
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        variables["params"]["block1"]["kernel"], want["params"]["student"]["block1"]["kernel"]
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1"]["mean"], np.arange(4.0, dtype=np.float32) + 2
    )


def test_load_variables_from_workdir_without_best_takes_latest(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (1, 2):
        ckpt.save(step, _state(step), {})
    ckpt.close()
    variables, metadata = checkpointing.load_variables(tmp_path)
    assert (metadata["checkpoint"], metadata["step"]) == ("latest", 2)
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1"]["mean"], np.arange(4.0, dtype=np.float32) + 2
    )


def test_load_variables_reads_the_best_step_of_the_two_directory_layout(tmp_path):
    """Workdirs of the earlier layout kept the best step in workdir/best, sealed by one
    integrity.json for the whole step: still read, still checked."""
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (2, 4):
        ckpt.save(step, _state(step), {"epoch": step})
    ckpt.close()
    legacy = tmp_path / checkpointing.LEGACY_BEST_DIR / "2"
    legacy.parent.mkdir()
    (tmp_path / "checkpoints" / "2").rename(legacy)
    for record in legacy.glob(f"*/{checkpointing.INTEGRITY_FILE}"):
        record.unlink()
    checkpointing.write_integrity(legacy)
    variables, metadata = checkpointing.load_variables(tmp_path)
    assert (metadata["checkpoint"], metadata["step"]) == ("best", 2)
    assert metadata["directory"] == str(legacy)
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1"]["mean"], np.arange(4.0, dtype=np.float32) + 2
    )
    files = [p for p in legacy.glob("state/**/*") if p.is_file()]
    damaged = max(files, key=lambda p: p.stat().st_size)
    damaged.write_bytes(damaged.read_bytes()[:-1])
    with pytest.raises(checkpointing.CorruptCheckpointError, match="bytes"):
        checkpointing.verify_integrity(legacy)
    _, metadata = checkpointing.load_variables(tmp_path)  # the damaged best is skipped
    assert (metadata["checkpoint"], metadata["step"]) == ("latest", 4)


def test_load_variables_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        checkpointing.load_variables(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpointing.load_variables(tmp_path)


def _record(item_dir: pathlib.Path) -> dict:
    return json.loads((item_dir / checkpointing.INTEGRITY_FILE).read_text())


def test_every_item_of_a_saved_step_carries_an_integrity_record(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1)
    ckpt.save(1, _state(1), {"a": 1}, metrics={"eval/top1": 0.5})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "1"
    path = step_dir / "extra" / "metadata"
    assert _record(step_dir / "extra") == {
        "metadata": [path.stat().st_size, zlib.crc32(path.read_bytes())]
    }
    state_files = {
        str(p.relative_to(step_dir / "state"))
        for p in (step_dir / "state").rglob("*")
        if p.is_file() and p.name not in (checkpointing.INTEGRITY_FILE, "commit_success.txt")
    }
    assert set(_record(step_dir / "state")) == state_files and len(state_files) > 2
    checkpointing.verify_integrity(step_dir)


def test_partial_step_of_an_interrupted_save_is_removed(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    ckpt.save(1, _state(1), {"at": 1})
    ckpt.close()
    # Where orbax writes step 3 until it is complete, named by orbax's own path class; a
    # later run saves steps before 3 (so that no save of step 3 replaces the leftover).
    final = epath.Path(tmp_path / "checkpoints" / "3")
    partial = pathlib.Path(ocp.path.atomicity.AtomicRenameTemporaryPath.from_final(final).get())
    assert partial.parent == final.parent and partial.name != "3"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    reopened = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    assert reopened.latest_step() == 1
    assert reopened.restore(_state(0))[1] == {"at": 1}
    assert reopened.save(2, _state(2), {"at": 2})  # orbax removes the leftover first
    reopened.close()
    assert not partial.exists()
    assert _saved_steps(tmp_path / "checkpoints") == [1, 2]


def _damage(path: pathlib.Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
def test_damaged_step_is_named_set_aside_and_the_previous_restored(tmp_path, how, caplog):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"at": step})
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "2"
    record = _record(step_dir / "state")
    largest = "state/" + max(record, key=lambda name: record[name][0])
    _damage(step_dir / largest, how)
    with pytest.raises(checkpointing.CorruptCheckpointError, match=str(step_dir / largest)):
        checkpointing.verify_integrity(step_dir)

    reopened = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    with caplog.at_level("ERROR"):
        state, extra = reopened.restore(_state(0))
    _assert_states_equal(state, _state(1))
    assert extra == {"at": 1}
    assert f"Checkpoint step 2 in {tmp_path / 'checkpoints'} is unusable" in caplog.text
    assert str(step_dir / largest) in caplog.text
    assert not step_dir.exists() and (tmp_path / "corrupt" / "checkpoints_2").is_dir()
    # The step can be saved again, and the run goes on from there.
    assert reopened.save(2, _state(22), {"at": 22}, force=True)
    reopened.close()
    assert _saved_steps(tmp_path / "checkpoints") == [1, 2]


def test_damaged_json_without_record_still_falls_back(tmp_path, caplog):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"at": step})
    ckpt.close()
    (tmp_path / "checkpoints" / "2" / "extra" / checkpointing.INTEGRITY_FILE).unlink()
    (tmp_path / "checkpoints" / "2" / "extra" / "metadata").write_text('{"at": ')
    with caplog.at_level("ERROR"):
        _, extra = checkpointing.Checkpointer(tmp_path, save_interval_steps=1).restore(_state(0))
    assert extra == {"at": 1}
    assert "Checkpoint step 2" in caplog.text


def test_all_steps_unreadable_is_an_error(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    ckpt.save(1, _state(1), {})
    ckpt.close()
    (tmp_path / "checkpoints" / "1" / "extra" / "metadata").write_text("{")
    with pytest.raises(ValueError, match=r"None of the checkpoints .* can be read \(steps \[1\]"):
        checkpointing.Checkpointer(tmp_path, save_interval_steps=1).restore(_state(0))


def test_load_variables_skips_a_damaged_step(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (1, 2):
        ckpt.save(step, _state(step), {})
    ckpt.close()
    (tmp_path / "checkpoints" / "2" / "extra" / "metadata").write_text("{")
    _, metadata = checkpointing.load_variables(tmp_path)
    assert metadata["step"] == 1
    assert (tmp_path / "checkpoints" / "2").exists()  # reading never moves anything


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bkd_jax.training import checkpointing

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    w = np.arange(48, dtype=np.float32).reshape(16, 3)
    state = {
        "params": {"student": {"w": jax.device_put(w, rows)}},
        "rng": jax.device_put(jax.random.key(5), replicated),
        "step": 3,
    }
    ckpt = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1)
    ckpt.save(3, state, {"epoch": 1}, metrics={"eval/top1": 0.5})
    ckpt.close()

    for target_sharding in (rows, replicated):
        target = {
            "params": {"student": {"w": jax.ShapeDtypeStruct((16, 3), np.float32,
                                                             sharding=target_sharding)}},
            "rng": jax.ShapeDtypeStruct((), state["rng"].dtype, sharding=replicated),
            "step": 0,
        }
        restored, extra = checkpointing.Checkpointer(sys.argv[1], save_interval_steps=1).restore(
            target)
        got = restored["params"]["student"]["w"]
        assert got.sharding == target_sharding, got.sharding
        assert len(got.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(got), w)
        assert restored["rng"].sharding == replicated
        np.testing.assert_array_equal(jax.random.key_data(restored["rng"]),
                                      jax.random.key_data(jax.random.key(5)))
        assert restored["step"] == 3 and extra == {"epoch": 1}

    variables, _ = checkpointing.load_variables(sys.argv[1])
    np.testing.assert_array_equal(variables["params"]["w"], w)
    print("SHARDED_OK")
    """
)


def test_sharded_state_restores_onto_target_shardings(tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(REPO),
    }
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED_OK" in result.stdout


# Two processes restore from one workdir; process 1 alone finds step 2 damaged (as when a
# file changes between the processes' reads): both must resume from step 1.
_AGREE_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bkd_jax.training import checkpointing

    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    verify = checkpointing.verify_integrity

    def verify_damaged_on_process_1(directory):
        if jax.process_index() == 1 and directory.name == "2":
            raise checkpointing.CorruptCheckpointError(f"{directory}: damaged here")
        verify(directory)

    checkpointing.verify_integrity = verify_damaged_on_process_1
    replicated = NamedSharding(jax.make_mesh((2,), ("data",)), P())
    target = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=replicated)}
    ckpt = checkpointing.Checkpointer(sys.argv[3], save_interval_steps=1, best_metric=None)
    state, extra = ckpt.restore(target)
    ckpt.close()
    print("RESTORED", extra["at"], np.asarray(state["w"].addressable_data(0)).tolist())
    """
)


def test_processes_agree_on_a_step_only_one_of_them_cannot_read(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=1, best_metric=None)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.arange(4.0) + step}, {"at": step})
    ckpt.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": str(REPO),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AGREE_SCRIPT, address, str(index), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in (0, 1)
    ]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        assert "RESTORED 1 [1.0, 2.0, 3.0, 4.0]" in output, output[-3000:]
    assert "another process found a file damaged" in outputs[0]
    assert "damaged here" in outputs[1]
    assert (tmp_path / "corrupt" / "checkpoints_2").is_dir()
    assert _saved_steps(tmp_path / "checkpoints") == [1]
