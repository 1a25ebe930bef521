"""A console progress line for long loops: steps done, images/s, ETA and latest scalars.

On a terminal the line is redrawn in place with a carriage return a few times a second;
anywhere else (CI logs, Colab cells, files) a plain line is printed every `refresh_s`
seconds, so logs stay readable. Throughput is an exponential moving average over the
intervals between redraws, which damps the jitter of asynchronous dispatch. Its clock
starts when the first step is done, not when the loop starts: that step includes the
compilation, which on a short run can take longer than all the other steps together and
would inflate the ETA many times over; until a second step is done the ETA is "--".
Standard library only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO


def format_duration(seconds: float) -> str:
    """`H:MM:SS`, with a day count in front past 24 hours: 93784 -> '1d 02:03:04'."""
    days, rest = divmod(round(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}"


class Progress:
    """Reports the progress of a loop of `total_steps` steps on `stream`.

    Args:
      total_steps: the step the loop ends at.
      images_per_step: examples per step (the global batch), for images/s.
      initial_step: the step the loop starts from (after a resume).
      stream: where to write; stderr by default.
      interactive: redraw in place; by default, whether `stream` is a TTY.
      refresh_s: seconds between redraws; 0.5 when interactive, else 60.
      smoothing: weight of the newest interval in the moving average of throughput.
      clock: seconds as a float; `time.monotonic` by default (tests pass a fake one).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        images_per_step: int,
        initial_step: int = 0,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        refresh_s: float | None = None,
        smoothing: float = 0.3,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._total = total_steps
        self._images_per_step = images_per_step
        self._stream = sys.stderr if stream is None else stream
        self._interactive = self._stream.isatty() if interactive is None else interactive
        self._refresh_s = refresh_s if refresh_s is not None else (0.5 if self._interactive else 60)
        self._smoothing = smoothing
        self._clock = clock
        self._step = initial_step
        self._shown_step, self._shown_time = initial_step, clock()
        # Where the throughput is measured from: None until the first (compiling) step is done.
        self._timed_from: tuple[int, float] | None = None
        self._steps_per_s: float | None = None
        self._scalars: dict[str, float] = {}
        self._width = 0

    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        """Records that `step` is done, with the latest scalars; redraws when it is time."""
        self._step = step
        self._scalars.update(scalars or {})
        now = self._clock()
        if self._timed_from is None:  # the first step, with its compilation: timed from its end
            self._timed_from = step, now
        if step >= self._total or now - self._shown_time >= self._refresh_s:
            self._show()

    def _line(self) -> str:
        step, total = self._shown_step, self._total
        parts = [f"step {step}/{total} ({100 * step / total:.1f}%)"]
        if self._steps_per_s is None:
            parts += ["-- img/s", "ETA --"]
        else:
            eta = max(total - step, 0) / self._steps_per_s
            parts += [
                f"{self._steps_per_s * self._images_per_step:.1f} img/s",
                f"ETA {format_duration(eta)}",
            ]
        if self._scalars:
            parts.append(" ".join(f"{k} {float(v):.4g}" for k, v in self._scalars.items()))
        return " | ".join(parts)

    def _measure(self, now: float) -> None:
        """Folds the steps done since the last measurement into the smoothed rate."""
        if self._timed_from is None:
            return
        step, then = self._timed_from
        if now > then and self._step > step:
            rate = (self._step - step) / (now - then)
            previous = self._steps_per_s
            self._steps_per_s = (
                rate if previous is None else previous + self._smoothing * (rate - previous)
            )
            self._timed_from = self._step, now

    def _show(self) -> None:
        now = self._clock()
        self._measure(now)
        self._shown_step, self._shown_time = self._step, now
        text = self._line()
        if self._interactive:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Shows the final state (if not shown yet) and ends the line."""
        if self._step != self._shown_step:
            self._show()
        if self._interactive:
            self._stream.write("\n")
            self._stream.flush()
