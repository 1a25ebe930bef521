"""Tests for bkd_jax.training.progress: durations, images/s and ETA under a fake clock, and the two
output styles (redrawn line on a terminal, plain periodic lines elsewhere)."""

import io

import pytest

from bkd_jax.training import progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0:00:00"),
        (59.6, "0:01:00"),
        (3723, "1:02:03"),
        (2 * 86400 + 3 * 3600 + 4 * 60 + 5, "2d 03:04:05"),
    ],
)
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text


def test_plain_lines_with_smoothed_rate_and_eta():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress(
        100,
        images_per_step=32,
        stream=out,
        interactive=False,
        refresh_s=10,
        smoothing=0.5,
        clock=clock,
    )
    clock.now = 5.0
    bar.update(10, {"loss": 2.0})  # before refresh_s: nothing printed
    assert out.getvalue() == ""
    clock.now = 10.0
    bar.update(20, {"loss": 1.5})  # 20 steps in 10 s: 2 steps/s = 64 img/s, 80 steps left
    clock.now = 20.0
    bar.update(30, {"top1": 0.25})  # 1 step/s now; smoothed 0.5*1 + 0.5*2 = 1.5 steps/s
    assert out.getvalue().splitlines() == [
        "step 20/100 (20.0%) | 64.0 img/s | ETA 0:00:40 | loss 1.5",
        "step 30/100 (30.0%) | 48.0 img/s | ETA 0:00:47 | loss 1.5 top1 0.25",
    ]
    clock.now = 22.0
    bar.update(31)
    bar.close()  # shows the unshown step: rate 0.5 steps/s -> 1.5 + 0.5*(0.5-1.5) = 1.0
    assert out.getvalue().splitlines()[-1] == (
        "step 31/100 (31.0%) | 32.0 img/s | ETA 0:01:09 | loss 1.5 top1 0.25"
    )


def test_terminal_redraws_in_place_and_last_step_always_shows():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress(
        4,
        images_per_step=10,
        initial_step=2,
        stream=out,
        interactive=True,
        refresh_s=1,
        clock=clock,
    )
    clock.now = 1.0
    bar.update(3, {"loss": 0.123456})  # the first step: no rate yet
    clock.now = 1.5
    bar.update(4)  # final step, shown before refresh_s: 1 step in 0.5 s = 2 steps/s
    bar.close()
    first = "step 3/4 (75.0%) | -- img/s | ETA -- | loss 0.1235"
    second = "step 4/4 (100.0%) | 20.0 img/s | ETA 0:00:00 | loss 0.1235"
    assert out.getvalue() == "\r" + first + "\r" + second.ljust(len(first)) + "\n"


def test_eta_leaves_out_the_compiling_first_step():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress(
        100, images_per_step=30, stream=out, interactive=False, refresh_s=0.5, clock=clock
    )
    clock.now = 2220.0  # step 1 compiles for 37 minutes
    bar.update(1)
    for step in range(2, 12):  # then 0.6 s per step
        clock.now += 0.6
        bar.update(step)
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/100 (1.0%) | -- img/s | ETA --"
    # 30 images / 0.6 s = 50 img/s; 89 steps left x 0.6 s = 53.4 s.
    assert lines[-1] == "step 11/100 (11.0%) | 50.0 img/s | ETA 0:00:53"


def test_no_rate_until_time_has_passed():
    clock, out = FakeClock(), io.StringIO()
    bar = progress.Progress(
        10, images_per_step=1, stream=out, interactive=False, refresh_s=0, clock=clock
    )
    bar.update(1)
    bar.close()
    assert out.getvalue() == "step 1/10 (10.0%) | -- img/s | ETA --\n"
