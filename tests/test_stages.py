"""The stage cache: finished stages are reused across runs and experiments, unfinished
ones are never trusted, forced ones are redone, and concurrent users take turns."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, diffsens
from hydra import compose, initialize_config_module

from diffsens_cli.errors import DiffsensError
from diffsens_cli.interrupt import Terminated
from diffsens_cli.pipelines.shared.image_stages import ImageStages
from diffsens_cli.rundir import RunDir
from diffsens_cli.stages import StageCache, checksums, verify

ONES = {"x": np.ones(3)}


def test_a_finished_stage_is_reused_by_a_new_cache(tmp_path):
    calls = []
    compute = lambda: calls.append(1) or {"x": np.arange(3.0) + len(calls)}  # each call's result differs
    first = StageCache(tmp_path).arrays("s", {"a": 1}, compute)
    again = StageCache(tmp_path).arrays("s", {"a": 1}, compute)  # another run, same depends: read, not computed
    other = StageCache(tmp_path).arrays("s", {"a": 2}, compute)
    assert len(calls) == 2 and first["x"].tolist() == again["x"].tolist() == [1.0, 2.0, 3.0]
    assert other["x"].tolist() == [2.0, 3.0, 4.0]
    done = json.loads((StageCache(tmp_path).path("s", {"a": 1}) / "done.json").read_text())
    assert done["depends"] == {"a": 1} and done["stage"] == "s"


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt(), Terminated()])
def test_an_interrupted_stage_is_not_finished_and_resumes_from_its_files(tmp_path, interrupt):
    """work() writes a partial file, then fails (an error, Ctrl-C, or SIGTERM's Terminated):
    no done.json, the lock released; the next attempt finds the partial file (a training
    stage resumes from its checkpoints) and finishes."""
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


def test_stage_times_count_each_stage_once_without_the_stages_it_needed(tmp_path, monkeypatch):
    """The summary's ``stage_times_s`` comes from the cache, so every stage of every pipeline
    is timed; a stage computed inside another (a training inside a sampling) is not counted
    twice. The clock moves only when a stage says it worked (3 s inside, 1 s outside it), so
    the times are exact; a reuse costs nothing on this clock."""
    clock = [0.0]
    monkeypatch.setattr("diffsens_cli.stages.time.perf_counter", lambda: clock[0])
    cache = StageCache(tmp_path)

    def work(seconds: float, then=lambda: ONES) -> dict:
        clock[0] += seconds
        return then()

    cache.arrays("outer", {"a": 1}, lambda: work(1.0, lambda: cache.arrays("inner", {"a": 1}, lambda: work(3.0))))
    cache.arrays("outer", {"a": 1}, lambda: work(100.0))  # reused: no work
    assert cache.timings == {"inner": 3.0, "outer": 1.0}
    run = RunDir(tmp_path / "run", cache)
    assert json.loads(run.write_summary({}).read_text())["stage_times_s"] == {"inner": 3.0, "outer": 1.0}


def test_a_stage_whose_result_is_all_nan_is_refused_and_not_kept(tmp_path):
    """psi all NaN (a perturbation beyond the dtype's range) must not become a finished stage
    that every later run reuses: one line naming the stage and the array, no done.json."""
    cache = StageCache(tmp_path)
    dead = lambda: {"psi": np.full((4, 2), np.nan), "remainder": np.array([np.inf, -np.inf]), "n": np.arange(3)}
    with pytest.raises(DiffsensError, match=r"^stage psi: every value of psi \(8 values\), remainder \(2 values\) "
                                            r"is NaN or infinite; nothing was kept"):
        cache.arrays("psi", {"a": 1}, dead)
    assert not cache.is_done("psi", {"a": 1})
    assert StageCache(tmp_path).arrays("psi", {"a": 1}, lambda: ONES)["x"].tolist() == [1, 1, 1]


def test_some_nan_in_a_stage_is_kept_and_told_with_its_share_each_time_it_is_used(tmp_path, capsys):
    run = RunDir(tmp_path / "run", StageCache(tmp_path / "stages"))
    some = {"psi": np.array([1.0, np.nan, 2.0, 3.0]), "label": np.array(["a", "b"]), "empty": np.zeros(0)}
    line = "stage psi: 25.0% of the 4 values of psi are NaN or infinite"
    for _ in range(2):  # computed, then reused
        arrays = run.cache.arrays("psi", {"a": 1}, lambda: some)
        assert np.isnan(arrays["psi"][1]) and capsys.readouterr().err == f"diffsens: warning: {line}\n"
    assert run.warnings == [line, line]


def test_a_kept_stage_that_is_all_nan_stops_in_one_line(tmp_path):
    """A stage an older diffsens kept with every value NaN is not used as a result."""
    cache = StageCache(tmp_path)
    cache.arrays("psi", {"a": 1}, lambda: ONES)
    path = cache.path("psi", {"a": 1})
    np.savez(path / "arrays.npz", psi=np.full(3, np.nan))
    (path / "done.json").write_text(json.dumps({"files": checksums(path)}))
    with pytest.raises(DiffsensError, match=r"stage psi: every value of psi \(3 values\) is NaN or infinite; an "
                                            r"older diffsens kept it: recompute it with stages.force=\[psi\]"):
        StageCache(tmp_path).arrays("psi", {"a": 1}, lambda: ONES)


def test_a_saved_array_that_is_all_nan_is_a_warning_of_the_run(tmp_path, capsys):
    """Arrays a run saves may hold some NaN (an undefined correlation); none finite is told."""
    run = RunDir(tmp_path / "run", StageCache(tmp_path / "stages"))
    run.save_arrays("arrays", {"corr": np.array([0.5, np.nan]), "psi": np.full(2, np.nan)})
    line = "arrays.npz: every one of the 2 values of psi is NaN or infinite"
    assert capsys.readouterr().err == f"diffsens: warning: {line}\n" and run.warnings == [line]


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


# Tiny digits_typography with enough training steps that a signal can land mid-training.
SIGNALLED_RUN = ["run", "experiment=digits_typography", "size=tiny", "hydra.run.dir=run", "solver.progress=false",
                 "train.steps=80", "train.checkpoint_every=5"]


def _stages(tmp_path: Path) -> dict[str, bool]:
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    return {s["stage"]: s["reused"] for s in summary["stages"]}


def test_ctrl_c_during_training_leaves_the_cache_consistent_and_the_next_run_resumes(tmp_path):
    """SIGINT while the retrained model trains (after the base model and the sensitivities
    finished): the retraining stage is not marked finished, the next run reuses what
    finished and completes the rest, and a plot-only change recomputes nothing. (SIGTERM
    raises Terminated, a KeyboardInterrupt, in the same place: the stage cache's handling of
    it is tested above, a process killed with it in test_cluster.)"""
    proc = subprocess.Popen([sys.executable, "-m", "diffsens_cli", *SIGNALLED_RUN], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    deadline = time.time() + 300
    retrain = tmp_path / "outputs" / "stages" / "train_retrain"
    while not list(retrain.glob("*/checkpoints/step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    # one line, not a 50-line traceback: what stopped, and that the same command resumes it
    lines = [line for line in err.splitlines() if line.startswith("diffsens:")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"diffsens: interrupted during stage train_retrain ({retrain}/")  # absolute: shared
    assert lines[0].endswith("run the same command again to resume (finished stages and training checkpoints "
                             "are kept)")
    assert list(retrain.glob("*/checkpoints/step-*"))
    assert not list(retrain.glob("*/done.json"))
    assert len(list((tmp_path / "outputs" / "stages" / "train_base").glob("*/done.json"))) == 1

    r = diffsens(*SIGNALLED_RUN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    stages = _stages(tmp_path)
    assert stages["train_base"] and stages["sensitivity"] and not stages["train_retrain"]
    assert list(retrain.glob("*/done.json")) and not list(retrain.glob("*/checkpoints"))  # finished: its model only
    r = diffsens(*SIGNALLED_RUN, "predict.grid_samples=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(_stages(tmp_path).values())


def test_a_dropped_ctrl_c_still_stops_the_next_step(monkeypatch):
    """SIGINT raises KeyboardInterrupt at once (SIGTERM: Terminated); if that raise is dropped (it happened inside a
    destructor), the next check() in a training or integration loop raises it again."""
    from diffsens_cli import interrupt

    previous = {sig: signal.getsignal(sig) for sig in interrupt.STOP_SIGNALS}
    monkeypatch.setattr(interrupt, "_requested", None)
    interrupt.check()  # nothing requested: no exception
    try:
        interrupt.install()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
        with pytest.raises(interrupt.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        with pytest.raises(interrupt.Terminated):
            interrupt.check()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- what the cache checks before it trusts a finished stage --------------------------

def _finished(root: Path, value: float = 1.0) -> tuple[list[int], Path]:
    """A finished arrays stage under ``root``; returns the list its compute appends to and its path."""
    calls: list[int] = []
    StageCache(root).arrays("s", 1, lambda: calls.append(1) or {"psi": np.full(3, value)})
    return calls, StageCache(root).path("s", 1)


def _recompute(root: Path, calls: list[int]) -> np.ndarray:
    return StageCache(root).arrays("s", 1, lambda: calls.append(1) or {"psi": np.full(3, 2.0)})["psi"]


def test_done_json_records_a_checksum_of_every_file(tmp_path):
    _, path = _finished(tmp_path)
    files = json.loads((path / "done.json").read_text())["files"]
    data = (path / "arrays.npz").read_bytes()
    assert files == {"arrays.npz": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}


@pytest.mark.parametrize("damage", ["truncate", "replace", "delete", "old_done_json", "empty_manifest", "unlisted",
                                    "symlinked_file"])
def test_a_stage_that_fails_its_check_is_set_aside_and_recomputed(tmp_path, capsys, damage):
    """A truncated file, a valid file with other contents (NaN psi), a missing file, a
    done.json without checksums, one that lists nothing beside other arrays, an extra file,
    and a file swapped for a symlink to an identical copy are each named in one line, set
    aside whole, recomputed."""
    calls, path = _finished(tmp_path)
    npz = path / "arrays.npz"
    if damage == "empty_manifest":
        np.savez_compressed(npz, psi=np.full(3, 7.0))
        (path / "done.json").write_text(json.dumps({"files": {}}))
    elif damage == "unlisted":
        (path / "extra").mkdir()
        (path / "extra" / "more.npz").write_bytes(b"x")
    elif damage == "symlinked_file":
        copy = tmp_path / "copy.npz"
        copy.write_bytes(npz.read_bytes())
        npz.unlink()
        npz.symlink_to(copy)
    elif damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:40])
    elif damage == "replace":
        np.savez_compressed(npz, psi=np.full(3, np.nan))
    elif damage == "delete":
        npz.unlink()
    else:
        record = json.loads((path / "done.json").read_text())
        del record["files"]
        (path / "done.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert np.array_equal(_recompute(tmp_path, calls), np.full(3, 2.0)) and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    reason = {"truncate": "has 40 bytes", "replace": "does not match its checksum", "delete": "is missing",
              "old_done_json": "records no checksums", "empty_manifest": "arrays.npz is not listed in done.json",
              "unlisted": "extra/more.npz is not listed in done.json",
              "symlinked_file": "arrays.npz is a symlink"}[damage]
    assert len(err) == 1 and err[0].startswith(f"diffsens: warning: stage s/{path.name} ") and reason in err[0]
    aside = list((tmp_path / ".set-aside" / "s").iterdir())
    assert len(aside) == 1 and str(aside[0]) in err[0] and (aside[0] / "done.json").is_file()
    assert verify(path) is None  # the recomputed stage passes
    assert np.array_equal(_recompute(tmp_path, calls), np.full(3, 2.0)) and len(calls) == 2  # and is reused


@pytest.mark.parametrize("finished", [True, False])
def test_a_stage_directory_that_is_a_symlink_is_set_aside_and_never_written_through(tmp_path, capsys, finished):
    """A stage directory swapped for a symlink to another directory (holding a finished
    stage, or nothing) is set aside as the link itself and recomputed in a real
    directory; what it pointed to is left as it was."""
    calls, path = _finished(tmp_path / "cache")
    target = tmp_path / "elsewhere"
    if finished:
        shutil.copytree(path, target)
    else:
        target.mkdir()
    before = sorted((p.name, p.read_bytes()) for p in target.iterdir())
    shutil.rmtree(path)
    path.symlink_to(target)
    capsys.readouterr()
    assert np.array_equal(_recompute(tmp_path / "cache", calls), np.full(3, 2.0)) and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the stage directory is a symlink" in err[0]
    assert not path.is_symlink() and verify(path) is None
    assert sorted((p.name, p.read_bytes()) for p in target.iterdir()) == before


def test_a_stage_that_writes_nothing_and_fails_leaves_only_its_lock_file(tmp_path):
    """A stage that fails before writing anything (say, loading its data) leaves no stage
    directory, only its (hidden, kept) lock file; one that wrote something keeps it, to
    resume from."""
    def fails(path: Path) -> None:
        raise DiffsensError("dataset.root: no such folder")

    def files() -> list[str]:
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())

    train, other = (StageCache(tmp_path).path(name, 1).name for name in ("train", "other"))
    with pytest.raises(DiffsensError):
        StageCache(tmp_path / "stages").run("train", 1, fails)
    assert files() == [f"stages/train/.{train}.lock"]
    StageCache(tmp_path / "stages").arrays("other", 1, lambda: ONES)
    with pytest.raises(DiffsensError):
        StageCache(tmp_path / "stages").run("train", 1, fails)
    assert files() == [f"stages/other/.{other}.lock", f"stages/other/{other}/arrays.npz",
                       f"stages/other/{other}/done.json", f"stages/train/.{train}.lock"]


@contextmanager
def _read_only(root: Path):
    """``root`` as a shared cache this process may read but not write: modes without w,
    and, for root (who writes anywhere), the effective user nobody meanwhile."""
    paths = [root, *root.rglob("*")]
    for p in paths:
        p.chmod(0o555 if p.is_dir() else 0o444)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        yield
    finally:
        if as_root:
            os.seteuid(0)
        for p in paths:
            p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def shared_dir():
    """A folder that other users may traverse (pytest's tmp_path is private to its owner)."""
    path = Path(tempfile.mkdtemp(prefix="diffsens-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_read_only_cache_serves_finished_stages_and_refuses_new_ones_in_one_line(shared_dir):
    calls, path = _finished(shared_dir / "stages")
    with _read_only(shared_dir / "stages"):
        with pytest.raises(PermissionError):
            (shared_dir / "stages" / "probe").write_text("")  # the cache really is read-only
        assert np.array_equal(StageCache(shared_dir / "stages").arrays("s", 1, lambda: ONES)["psi"], np.ones(3))
        with pytest.raises(DiffsensError, match=r"^stages.dir: cannot compute stage new: .* is not writable"):
            StageCache(shared_dir / "stages").arrays("new", 1, lambda: ONES)
    assert calls == [1] and sorted(p.name for p in (shared_dir / "stages").iterdir()) == ["s"]


def test_a_corrupt_stage_in_a_read_only_cache_stops_in_one_line(shared_dir):
    _, path = _finished(shared_dir / "stages")
    np.savez_compressed(path / "arrays.npz", psi=np.full(3, np.nan))
    with _read_only(shared_dir / "stages"), pytest.raises(DiffsensError) as e:
        StageCache(shared_dir / "stages").arrays("s", 1, lambda: ONES)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"stage s/{path.name} ")
    assert "does not match its checksum" in message and "stages.force=[s]" in message
    assert (path / "arrays.npz").is_file()  # left where it was


def test_a_truncated_stage_file_of_a_real_run_is_recomputed(tmp_path):
    """The reproduction: truncate a finished stage's arrays.npz; the rerun names it in one
    warning line, sets it aside and finishes (before: a BadZipFile traceback, every rerun)."""
    args = ["run", "experiment=gmm_first_order", "hydra.run.dir=run", "solver.progress=false",
            *TINY["gmm_first_order"]]
    assert diffsens(*args, cwd=tmp_path).returncode == 0
    npz = sorted(tmp_path.glob("outputs/stages/curve/*/arrays.npz"))[0]
    npz.write_bytes(npz.read_bytes()[:100])
    r = diffsens(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("diffsens: warning: stage curve/")]
    assert len(warnings) == 1 and "has 100 bytes" in warnings[0] and "Traceback" not in r.stderr
    assert verify(npz.parent) is None and len(list((tmp_path / "outputs/stages/.set-aside/curve").iterdir())) == 1
