"""Stopping cleanly on SIGTERM (preemption) or SIGINT (Ctrl-C): save, then exit.

Neither signal interrupts the program where it is: the handler only sets a flag, which
the training loop polls after each step, so a signal that arrives during a compilation,
a checkpoint write or a collective lets it finish, then the loop saves and returns. A
second Ctrl-C raises KeyboardInterrupt at once, for when waiting is not wanted.

On several processes every one of them must stop after the same step, or the others
would wait forever in the next step's collectives. There the decision is JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`): the coordination
service watches SIGTERM on every process and, once any of them got one, makes every
process see True at the same step. SIGINT is handed to that service as a SIGTERM.

A run stopped this way is not finished, so the command then exits with the status a shell
gives a process killed by the signal, 128 + its number (`exit_status`): 130 after Ctrl-C,
143 after SIGTERM. `main && next` then does not run `next`, and a scheduler that restarts
failed jobs (SLURM's --requeue, a Kubernetes Job) restarts a preempted one.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Turns SIGTERM and SIGINT into a stop request the training loop polls.

    Use it on the main thread, around the whole run (set-up and compilation included)::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, state, extra, force=True)
                    break

    `should_stop` must be called at every step, with increasing steps, on every process.
    The previous handlers are put back on exit. Off the main thread (where Python cannot
    install signal handlers) the guard installs nothing and never asks to stop.
    """

    def __init__(self):
        self._requested = False
        self._signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether this process got SIGTERM or SIGINT."""
        return self._requested

    @property
    def reason(self) -> str:
        """ "Interrupted" after this process's Ctrl-C, else "Preempted", for messages."""
        return "Interrupted" if self._signal == signal.SIGINT else "Preempted"

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, the shell's status for a process the signal ended:
        130 after this process's Ctrl-C, 143 (SIGTERM) after a preemption."""
        stopped_by = signal.SIGINT if self._signal == signal.SIGINT else signal.SIGTERM
        return 128 + stopped_by

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._requested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested, self._signal = True, signum
        logging.warning(
            "Got %s: will save a checkpoint after this step and stop%s.",
            signal.Signals(signum).name,
            " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "",
        )
        if jax.process_count() > 1 and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # to the coordination service's handler

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        # With several processes SIGTERM stays with JAX's coordination service.
        signums = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
        for signum in signums:
            # getsignal gives None for a handler installed outside Python; restore SIG_DFL.
            self._previous[signum] = signal.signal(signum, self._handle) or signal.SIG_DFL
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
