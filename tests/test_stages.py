"""The stage cache: finished stages are reused across runs and experiments, unfinished
ones are never trusted, forced ones are redone, and concurrent users take turns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from diffsens_cli.pipelines.image_stages import ImageStages
from diffsens_cli.stages import StageCache

ONES = {"x": np.ones(3)}


def test_a_finished_stage_is_reused_by_a_new_cache(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": np.arange(3.0)}
    first = StageCache(tmp_path).arrays("s", {"a": 1}, compute)
    again = StageCache(tmp_path).arrays("s", {"a": 1}, compute)  # another run, same depends
    other = StageCache(tmp_path).arrays("s", {"a": 2}, compute)
    assert len(calls) == 2 and np.array_equal(first["x"], again["x"]) and np.array_equal(other["x"], first["x"])
    done = json.loads((StageCache(tmp_path).path("s", {"a": 1}) / "done.json").read_text())
    assert done["depends"] == {"a": 1} and done["stage"] == "s"


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_interrupted_stage_is_not_finished_and_resumes_from_its_files(tmp_path, interrupt):
    """work() writes a partial file, then fails: no done.json; the next attempt finds the
    partial file (a training stage resumes from its checkpoints) and finishes."""
    seen = []

    def failing(path: Path) -> None:
        (path / "part-1").write_text("done")
        raise interrupt

    def resuming(path: Path) -> None:
        seen.append(sorted(p.name for p in path.iterdir()))
        (path / "part-2").write_text("done")

    with pytest.raises(type(interrupt)):
        StageCache(tmp_path).run("train", {"k": 1}, failing)
    assert not StageCache(tmp_path).is_done("train", {"k": 1})
    path = StageCache(tmp_path).run("train", {"k": 1}, resuming)
    assert seen == [["part-1"]] and (path / "done.json").is_file()


def test_forced_stages_are_recomputed_once_per_process(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or ONES
    StageCache(tmp_path).arrays("s", 1, compute)
    forced = StageCache(tmp_path, force=["s"])
    forced.arrays("s", 1, compute)
    forced.arrays("s", 1, compute)  # a second use in the same run: the fresh result
    StageCache(tmp_path, force=["other"]).arrays("s", 1, compute)
    assert len(calls) == 2
    StageCache(tmp_path, force=["all"]).arrays("s", 1, compute)
    assert len(calls) == 3


def test_concurrent_users_of_one_stage_take_turns(tmp_path):
    """Two jobs of a sweep needing the same stage: one computes, the other waits and reuses."""
    calls = []

    def slow() -> dict:
        calls.append(1)
        time.sleep(0.3)
        return ONES

    results = []
    threads = [threading.Thread(target=lambda: results.append(StageCache(tmp_path).arrays("s", 1, slow)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2


def _compose(experiment: str, *overrides: str):
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        return compose("config", overrides=[f"experiment={experiment}", *overrides])


def test_experiments_that_share_a_base_model_share_its_training_stage(tmp_path):
    """celeba_attributes_paper reuses celeba_oldman's base model; retraining and
    fine-tuning are keyed by S, and a sensitivity setting does not touch training."""
    cache = StageCache(tmp_path)
    oldman = ImageStages(_compose("celeba_oldman"), cache)
    attributes = ImageStages(_compose("celeba_attributes_paper"), cache)
    clamp = ImageStages(_compose("celeba_oldman", "solver.weight_clamp=null", "ot.reg=0.1"), cache)
    other_s = ImageStages(_compose("celeba_oldman", "perturbation.num_samples=100"), cache)
    key = lambda st, mode: cache.path(f"train_{mode}", st._train_depends(mode))
    assert key(oldman, "base") == key(attributes, "base") == key(clamp, "base") == key(other_s, "base")
    for mode in ("retrain", "finetune"):
        assert key(oldman, mode) == key(clamp, mode) != key(other_s, mode)
    assert key(oldman, "base") != key(ImageStages(_compose("celeba_oldman", "train.lr=2e-4"), cache), "base")


def _run(tmp_path: Path, *args: str, **kw) -> subprocess.Popen:
    from test_cli import TINY

    tiny = [a for a in TINY["digits_typography"] if not a.startswith("train.steps=")]
    cmd = [sys.executable, "-m", "diffsens_cli", "run", "experiment=digits_typography", "hydra.run.dir=run",
           "solver.progress=false", "train.steps=150", "train.checkpoint_every=5", *tiny, *args]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"}, **kw)


def _stages(tmp_path: Path) -> dict[str, bool]:
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return {s["stage"]: s["reused"] for s in summary["stages"]}


def test_ctrl_c_during_training_leaves_the_cache_consistent(tmp_path):
    """SIGINT while the retrained model trains (after the base model and the
    sensitivities finished): the retraining stage is not marked finished, and the next run
    reuses what finished, completes the rest, and a plot-only change recomputes nothing."""
    proc = _run(tmp_path)
    deadline = time.time() + 300
    retrain = tmp_path / "outputs" / "stages" / "train_retrain"
    while not list(retrain.glob("*/checkpoints/step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    assert list(retrain.glob("*/checkpoints/step-*"))
    assert not list(retrain.glob("*/done.json"))
    assert len(list((tmp_path / "outputs" / "stages" / "train_base").glob("*/done.json"))) == 1

    proc = _run(tmp_path)
    assert proc.wait(timeout=600) == 0, proc.communicate()[1][-2000:]
    stages = _stages(tmp_path)
    assert stages["train_base"] and stages["sensitivity"] and not stages["train_retrain"]
    proc = _run(tmp_path, "predict.grid_samples=1")
    assert proc.wait(timeout=600) == 0, proc.communicate()[1][-2000:]
    assert all(_stages(tmp_path).values())


def test_a_dropped_ctrl_c_still_stops_the_next_step(monkeypatch):
    """SIGINT raises KeyboardInterrupt at once; if that raise is dropped (it happened inside a
    destructor), the next check() in a training or integration loop raises it again."""
    from diffsens_cli import interrupt

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(interrupt, "_requested", False)
    interrupt.check()  # nothing requested: no exception
    try:
        interrupt.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    finally:
        signal.signal(signal.SIGINT, previous)
