"""One experiment split over jobs: ``-m shard.index=0,1,2 shard.count=3``.

The per-sample work of an experiment (blocks of ``shard.block`` model samples of a
sensitivity or sampling stage, one model sample's influence, one counterfactual
retraining) is a list of cached stages; job ``index`` of ``count`` computes every
``count``-th of them, starting at its own (the block stages of a run numbered on from
one list to the next, so no job gets every list's remainder), and writes a summary that
says so, without figures.  Work all jobs need (the base model) is computed by the first job that gets
there while the others wait on its lock.  The unsharded run then finds the shards'
stages cached, computes what needs every sample at once (an OT baseline), and
assembles the figures and the summary, bit for bit what a run that was never split
gives, since the stages do not depend on the split.  At the end of a
multirun, ``AssembleShards`` runs that unsharded job for each combination of the other
swept values.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffsens_cli import sweeps
from diffsens_cli.errors import DiffsensError, require, whole
from diffsens_cli.rundir import RunDir

T = TypeVar("T")
SHARD_KEYS = ("shard.index", "shard.count")


@dataclass(frozen=True)
class Shard:
    """Job ``index`` of ``count``, splitting work into lists of stages; ``block``: model
    samples per stage of a sampling or sensitivity integration (the ``shard`` group of
    configs/config.yaml holds the defaults)."""

    index: int
    count: int
    block: int

    @classmethod
    def of(cls, cfg: DictConfig) -> Shard:
        """The checked ``shard`` group of ``cfg``."""
        sc = cfg.shard
        count = whole(sc.count, "shard.count", at_least=1)
        index = whole(sc.index, "shard.index")
        require(0 <= index < count, "shard.index", f"must be in 0..{count - 1} (shard.count={count}), got {sc.index}")
        block = whole(sc.block, "shard.block", at_least=1)
        return cls(index, count, block)

    @property
    def partial(self) -> bool:
        """True for one job of several: it computes its share and assembles nothing."""
        return self.count > 1

    def mine(self, items: Sequence[T], first: int = 0) -> list[T]:
        """This job's share of ``items``, numbered from ``first``: every ``count``-th, from
        number ``index``.  Numbering a run's lists of stages on from one to the next
        spreads the remainders over the jobs instead of giving each list's to job 0."""
        return [x for number, x in enumerate(items, first) if number % self.count == self.index]

    def blocks(self, n: int) -> list[tuple[int, int]]:
        """The row ranges ``[start, stop)`` of the stages that ``n`` model samples split into."""
        return [(start, min(start + self.block, n)) for start in range(0, n, self.block)]

    def describe(self, computed: int, of: int) -> dict[str, Any]:
        return {"index": self.index, "count": self.count, "block": self.block, "stages_computed": computed,
                "stages_in_all": of}


def finish_partial(run: RunDir, shard: Shard, computed: int, of: int) -> None:
    """The summary of one job of a sharded run: its share, and how to assemble."""
    run.write_summary({}, shard=shard.describe(computed, of),
                      assemble="rerun without shard.index and shard.count (a multirun does it at its end)")
    print(f"shard {shard.index} of {shard.count}: {computed} of {of} stages are this job's; the run without "
          f"shard.index and shard.count assembles the figures and the summary")


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted value of a Hydra override: a quote, and the backslashes before
    a quote or the end, are escaped; other backslashes stand for themselves."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"


class AssembleShards(Callback):
    """At the end of a multirun that swept ``shard.index``: run the unsharded job of each
    combination of the other swept values, into ``<sweep dir>/assembled[/<k>]``, as a
    process of its own on this machine (it reads every job's stages from the cache)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Assemble; any failure is one ``diffsens: error:`` line and exit status 2 (an
        exception in a callback would only be logged by Hydra, and the sweep exit 0)."""
        try:
            self._assemble(config)
        except DiffsensError as e:
            print(f"diffsens: error: assembling the shards: {e}", file=sys.stderr)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 -- whatever it is, it must not pass as a warning
            print(f"diffsens: error: assembling the shards: {type(e).__name__}: {' '.join(str(e).split())}",
                  file=sys.stderr)
            sys.exit(2)

    def _assemble(self, config: DictConfig) -> None:
        parsed = sweeps.parse(list(config.hydra.overrides.task))
        if not any(o.key_or_group == "shard.index" for o in parsed):
            return
        # each shard key's values, typed as Hydra gives them to the jobs, and the jobs of the other swept values
        values = {o.key_or_group: list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
                  for o in parsed if o.key_or_group in SHARD_KEYS}
        # stages.force was done by the shards: forcing again would recompute every one of them
        rest = [o for o in parsed if o.key_or_group not in (*SHARD_KEYS, "stages.force")
                and not o.key_or_group.startswith("hydra")]
        jobs = sweeps.split_jobs(rest)
        # the swept values as the jobs' checks read them (2.0 is 2)
        counts = {whole(v, "shard.count") for v in values.get("shard.count", [])} or \
            {whole(config.shard.count, "shard.count")}
        require(len(counts) == 1, "shard.count", f"one value per sweep, got {sorted(counts)}")
        count = counts.pop()
        if count < 2:
            return
        missing = sorted(set(range(count)) - {whole(i, "shard.index") for i in values["shard.index"]})
        if missing:
            print(f"diffsens: shards {missing} of {count} were not run: nothing assembled; run them, or the "
                  f"command without shard.index and shard.count", file=sys.stderr)
            return
        root = Path(str(config.hydra.sweep.dir)).absolute() / "assembled"
        for k, job in enumerate(jobs):
            out = root / str(k) if len(jobs) > 1 else root
            which = f" of {' '.join(job)}" if len(jobs) > 1 else ""
            print(f"diffsens: assembling the shards{which} into {out}", flush=True)
            done = subprocess.run([sys.executable, "-m", "diffsens_cli", "run", *job,
                                   f"hydra.run.dir={hydra_quoted(str(out))}"])
            if done.returncode:
                sys.exit(done.returncode if done.returncode > 0 else 128 - done.returncode)
