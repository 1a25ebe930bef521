"""Tests for bkd_jax.training.checkpointing: round trips, retention, the config guard,
teacher weights and the preemption flag."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    assert _saved_steps(tmp_path / "checkpoints") == [4, 5]
    assert _saved_steps(tmp_path / "best") == [2]

    # The best value survives a restart: a worse metric later does not replace it.
    reopened = checkpointing.Checkpointer(tmp_path, save_interval_steps=100, max_to_keep=2)
    assert reopened.best_value == 0.5
    assert not reopened.save(6, _state(6), {}, metrics={"eval/top1": 0.45})
    assert reopened.save(7, _state(7), {}, metrics={"eval/top1": 0.6})
    reopened.close()
    assert _saved_steps(tmp_path / "best") == [7]


def test_restore_takes_the_newest_of_latest_and_best(tmp_path):
    ckpt = checkpointing.Checkpointer(tmp_path, save_interval_steps=10)
    ckpt.save(10, _state(10), {"at": 10})
    ckpt.save(13, _state(13), {"at": 13}, metrics={"eval/top1": 0.9})  # off schedule: best only
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
    assert _saved_steps(tmp_path / "best") == [2]


CONFIG = {"model": {"student": "resnet8x4", "teacher": "resnet32x4"}, "optim": {"lr": 0.05}}


def test_config_guard_writes_then_accepts_same_config(tmp_path):
    checkpointing.check_or_write_config(tmp_path, CONFIG)
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
    checkpointing.check_or_write_config(tmp_path, json.loads(json.dumps(CONFIG)))


def test_config_guard_refuses_changed_config_and_names_keys(tmp_path):
    checkpointing.check_or_write_config(tmp_path, CONFIG)
    written = (tmp_path / "config.json").read_text()
    changed = {"model": {"student": "resnet8x4", "teacher": "resnet56"}, "optim": {"lr": 0.05}}
    changed["seed"] = 1
    with pytest.raises(ValueError) as info:
        checkpointing.check_or_write_config(tmp_path, changed)
    message = str(info.value)
    assert 'model.teacher: "resnet32x4" -> "resnet56"' in message
    assert "seed: <absent> -> 1" in message
    assert "optim.lr" not in message and "model.student" not in message
    assert "fresh --workdir" in message
    assert (tmp_path / "config.json").read_text() == written


def test_config_guard_ignores_cosmetic_keys(tmp_path):
    checkpointing.check_or_write_config(tmp_path, {**CONFIG, "log": {"every": 10}})
    checkpointing.check_or_write_config(
        tmp_path, {**CONFIG, "log": {"every": 50, "tb": True}}, ignore={"log"}
    )
    with pytest.raises(ValueError, match=r"log\.every: 10 -> 50"):
        checkpointing.check_or_write_config(tmp_path, {**CONFIG, "log": {"every": 50}})


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
    assert metadata == {"checkpoint": "best", "step": 2, "extra": {"epoch": 2}}
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
    assert (metadata["checkpoint"], metadata["step"]) == ("checkpoints", 2)
    np.testing.assert_array_equal(
        variables["batch_stats"]["block1"]["mean"], np.arange(4.0, dtype=np.float32) + 2
    )


def test_load_variables_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        checkpointing.load_variables(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        checkpointing.load_variables(tmp_path)


def test_preemption_guard_sets_flag_and_restores_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        sentinel = signal.getsignal(signal.SIGTERM)
        with checkpointing.PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop(0)
            os.kill(os.getpid(), signal.SIGTERM)
            assert guard.requested and guard.should_stop(1)
        assert signal.getsignal(signal.SIGTERM) is sentinel
        assert calls == []  # the guard, not the previous handler, got the signal
    finally:
        signal.signal(signal.SIGTERM, previous)


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
