"""`config.profile_steps` writes a profiler trace of the chosen steps into the workdir."""

from __future__ import annotations

from bkd_jax.config_defaults import base_config
from bkd_jax.training import loop, profiling


def test_profile_steps_write_a_trace_of_steps_after_the_compile(tmp_path):
    config = base_config("digits", teacher="resnet8", student="resnet8", method="ce")
    config.num_train_steps, config.tensorboard, config.profile_steps = 6, False, 2
    profiler = profiling.StepProfiler(tmp_path, 0, 2)
    assert (profiler.first, profiler.last) == (3, 4)
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    traces = list((tmp_path / "run" / profiling.PROFILE_DIR).rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
