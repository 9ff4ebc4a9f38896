"""Ctrl-C that is never lost.

Python turns SIGINT into a KeyboardInterrupt at whatever bytecode runs next; when that
is inside a destructor or a garbage-collection callback, the exception is printed as
"Exception ignored" and dropped, and a long stage would run to its end.  The CLI's
handler also records the request, and the long loops (training steps, integration
steps) call ``check`` so that a dropped interrupt still stops the run at the next step.
"""

from __future__ import annotations

import signal

_requested = False


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
