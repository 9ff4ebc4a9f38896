"""Ctrl-C that is never lost, and reported in one line.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode runs next; when that
is inside a destructor or a garbage-collection callback, the exception is printed as
"Exception ignored" and dropped, and a long stage would run to its end.  The CLI's
handler also records the request, and the long loops (training steps, integration
steps) call ``check`` so that a dropped interrupt still stops the run at the next step.
Long pieces of work say what they are (``doing``), so the CLI can name what stopped.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_requested = False
_stopped: str | None = None


def install() -> None:
    """Handle SIGINT as Python does, and remember it (main thread only)."""

    def handler(signum, frame):
        global _requested
        _requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even if its first raise was dropped."""
    if _requested:
        raise KeyboardInterrupt


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
