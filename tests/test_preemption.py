"""Tests for bkd_jax.training.preemption: SIGTERM and SIGINT become a stop request."""

import os
import signal

import pytest

from bkd_jax.training import preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_flag_and_the_handlers_come_back(signum):
    calls = []
    previous = {s: signal.signal(s, lambda n, frame: calls.append(n)) for s in (signum,)}
    try:
        sentinel = signal.getsignal(signum)
        with preemption.PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop(0)
            os.kill(os.getpid(), signum)
            assert guard.requested and guard.should_stop(1)
            assert guard.reason == ("Interrupted" if signum == signal.SIGINT else "Preempted")
            assert guard.exit_status == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
        assert signal.getsignal(signum) is sentinel
        assert calls == []  # the guard, not the previous handler, got the signal
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_second_ctrl_c_aborts():
    # Python's own handler, whatever the suite inherited (a suite started with `nohup ... &`
    # starts with SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preemption.PreemptionGuard() as guard:
            os.kill(os.getpid(), signal.SIGINT)
            assert guard.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
