"""Progress bars for long work, one policy for every loop: shown on a terminal, silent
where stderr is not one (CI and cluster job logs, which a redrawn bar floods with
carriage returns), and off when the run's ``progress`` setting says so."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm.auto import tqdm


def bar(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``) under the policy above."""
    return tqdm(iterable, desc=desc, disable=None if enabled else True, **kwargs)
