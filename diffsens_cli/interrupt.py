"""Ctrl-C and SIGTERM (a kill, a cluster's time limit) that are never lost, and
reported in one line.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode runs next; when that
is inside a destructor or a garbage-collection callback, the exception is printed as
"Exception ignored" and dropped, and a long stage would run to its end.  The CLI's
handler also records the request, and the long loops (training steps, integration
steps) call ``check`` so that a dropped interrupt still stops the run at the next step.
Long pieces of work say what they are (``doing``), so the CLI can name what stopped.
SIGTERM takes the same path as a ``Terminated`` KeyboardInterrupt, so locks are released
and unfinished stages left unfinished just as after Ctrl-C.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_requested: signal.Signals | None = None
_stopped: str | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _raise(signum: int) -> None:
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def install() -> None:
    """Handle SIGINT as Python does and SIGTERM likewise, and remember them (main thread only)."""

    def handler(signum, frame):
        global _requested
        _requested = signal.Signals(signum)
        _raise(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def check() -> None:
    """Raise KeyboardInterrupt (``Terminated`` for SIGTERM) if a signal came, even if its
    first raise was dropped."""
    if _requested is not None:
        _raise(_requested)


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
