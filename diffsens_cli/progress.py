"""Progress bars for long work, one policy for every loop: a live bar on a terminal; where
stderr is not one (CI, cluster job logs), one plain line every 30 seconds instead of a
bar redrawn with carriage returns (which floods a log file); none when the run's
``progress`` setting is off."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


# Terminal control sequences (a nested bar moves the cursor up with ESC [ A).
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream for tqdm that turns each redraw into one line (blank redraws and cursor
    movements dropped)."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, ""

    def write(self, text: str) -> None:
        text = _CONTROL.sub("", text.replace("\r", "")).strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``) under the policy above."""
    if not enabled:
        return tqdm(iterable, desc=desc, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, **kwargs)
    return tqdm(iterable, desc=desc, file=_Lines(sys.stderr), mininterval=LOG_INTERVAL_S, ascii=True,
                **{k: v for k, v in kwargs.items() if k != "leave"})
