"""Ctrl-C, SIGTERM and SIGUSR2 (a kill; a cluster's time limit or preemption) that are
never lost, stop work where it can resume, and are reported in one line.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode runs next; when that
is inside a destructor or a garbage-collection callback, the exception is printed as
"Exception ignored" and dropped, and a long stage would run to its end.  The handler
also records the request, and the long loops (training steps, integration steps) call
``check`` so that a dropped interrupt still stops the run at the next step.  SIGTERM
and SIGUSR2 take the same path as a ``Terminated`` KeyboardInterrupt, so locks are
released and unfinished stages left unfinished just as after Ctrl-C.

A training loop runs inside ``at_step_boundaries``: there the first signal only records
itself, and the loop writes a checkpoint at the end of its step before it stops (a
second signal stops at once).  Slurm, through submitit, sends SIGUSR2 (submitit's
``SUBMITIT_PREEMPT_SIGNAL``) before a time limit or a preemption, and submitit's
handler requeues the job.  In a submitit job (``SUBMITIT_EXECUTOR`` set) ``handlers``
takes that signal and SIGINT, keeps the handlers it replaced, and leaves SIGTERM to
submitit (which ignores it: Slurm sends it with a requeue); ``hand_over`` gives the
handlers back and calls submitit's once the work has stopped cleanly, so the requeued
job resumes from the stage cache and the checkpoints.
Long pieces of work say what they are (``doing``), so the CLI can name what stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

_requested: signal.Signals | None = None
_stopped: str | None = None
_deferring = 0
_previous: dict[signal.Signals, Any] = {}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR2, handled as Ctrl-C is."""


def _raise(signum: int) -> None:
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def _handler(signum: int, frame: Any) -> None:
    global _requested
    first = _requested is None
    _requested = signal.Signals(signum)
    if _deferring and first:
        return  # the loop stops at the end of its step (its next ``check``)
    _raise(signum)


def install() -> None:
    """Handle SIGINT as Python does and SIGTERM and SIGUSR2 likewise, and remember them
    (main thread only); a new command starts with no signal recorded."""
    global _requested, _stopped
    _requested = _stopped = None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def _submitit_signals() -> tuple[signal.Signals, ...]:
    """The signals this process handles in a submitit job: SIGINT and submitit's preemption signal."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return signal.SIGINT, getattr(signal, f"SIG{name}", signal.SIGUSR2)


@contextmanager
def handlers() -> Iterator[None]:
    """Within this block (one job of a run) the stop signals are handled here: in a
    submitit job SIGINT and submitit's preemption signal, whose handlers are kept for
    ``hand_over`` and put back afterwards; elsewhere as ``install`` does (the CLI already did)."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        yield
        return
    for sig in _submitit_signals():
        _previous[sig] = signal.signal(sig, _handler)
    try:
        yield
    finally:
        _restore()


def _restore() -> None:
    for sig, previous in _previous.items():
        signal.signal(sig, previous)
    _previous.clear()


def requested() -> signal.Signals | None:
    """The stop signal that came, if any."""
    return _requested


def check() -> None:
    """Raise KeyboardInterrupt (``Terminated`` for SIGTERM and SIGUSR2) if a signal came,
    even if its first raise was dropped."""
    if _requested is not None:
        _raise(_requested)


@contextmanager
def at_step_boundaries() -> Iterator[None]:
    """Within this block a first stop signal is only recorded: the loop inside finishes
    its step, saves, and stops at its ``check``."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def hand_over() -> None:
    """In a submitit job, put back the handlers ``handlers`` replaced and call the one of
    the signal that stopped the work: submitit's requeues the job (and exits)."""
    previous = _previous.get(_requested) if _requested else None
    _restore()
    if callable(previous) and previous is not signal.default_int_handler:
        previous(int(_requested), None)


@contextmanager
def doing(what: str) -> Iterator[None]:
    """Within this block ``what`` is under way; a Ctrl-C inside it is reported as having
    stopped the innermost such piece of work (``stopped``)."""
    global _stopped
    try:
        yield
    except KeyboardInterrupt:
        _stopped = _stopped or what
        raise


def stopped() -> str | None:
    """The innermost piece of work a Ctrl-C stopped, if any."""
    return _stopped
