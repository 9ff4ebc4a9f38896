"""Running on a cluster: the Slurm preset and site file, sweeps as separate processes
(submitit's local executor), threads per job, and a stage cache shared by jobs that
die, are killed or run on other file systems."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import diffsens
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffsens_cli.errors import DiffsensError
from diffsens_cli.sharding import AssembleShards, Shard, hydra_quoted
from diffsens_cli.stages import DONE, StageCache, atomic_write, lock_scope
from diffsens_cli.threads import cpus_given, visible_cpus

# -- threads ------------------------------------------------------------------------

def test_a_job_takes_its_cpus_from_the_launcher_then_slurm_then_omp():
    """The launcher's cpus_per_task first (local jobs inside a Slurm allocation inherit its SLURM_CPUS_PER_TASK)."""
    assert cpus_given(4, {"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "2"}) == (4, "hydra.launcher.cpus_per_task")
    assert cpus_given(None, {"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "2"}) == (3, "SLURM_CPUS_PER_TASK")
    assert cpus_given(None, {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    assert cpus_given(None, {"OMP_NUM_THREADS": "6,2"}) == (6, "OMP_NUM_THREADS")
    assert cpus_given(None, {}) is None
    with pytest.raises(DiffsensError, match=r"^SLURM_CPUS_PER_TASK='0': not a positive whole number of CPUs$"):
        cpus_given(None, {"SLURM_CPUS_PER_TASK": "0"})
    with pytest.raises(DiffsensError, match="^hydra.launcher.cpus_per_task='two'"):
        cpus_given("two", {})


# -- the launcher preset and the site file -------------------------------------------

def _launcher(monkeypatch, site: Path, *overrides: str):
    monkeypatch.setenv("DIFFSENS_CONFIG_DIR", str(site))
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return cfg.hydra.launcher


def test_the_slurm_preset_reads_the_site_file_when_it_exists(tmp_path, monkeypatch):
    """Without a site file: the preset's values and no partition.  With one (the shipped
    example, filled in): its values win over the preset's; the command line wins over both."""
    bare = _launcher(monkeypatch, tmp_path)
    assert bare._target_.endswith("SlurmLauncher")
    assert (bare.partition, bare.timeout_min, bare.cpus_per_task, bare.signal_delay_s) == (None, 240, 8, 120)
    site = yaml.safe_load((Path(__file__).parents[1] / "configs" / "site" / "slurm.yaml.example").read_text())
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "slurm.yaml").write_text(yaml.safe_dump({**site, "account": "lab", "timeout_min": 30}))
    filled = _launcher(monkeypatch, tmp_path, "hydra.launcher.mem_gb=8")
    assert (filled.partition, filled.account, filled.timeout_min, filled.mem_gb) == ("gpu", "lab", 30, 8)


@pytest.mark.parametrize("content,problem", [
    (b"partition: [gpu\n", "not valid YAML: "),
    (b"\x89\xff\xfe\x00binary", "not a text file (the Slurm site settings are YAML)"),
    (b"- gpu\n", "must be a mapping of Slurm launcher settings (partition: gpu, ...), got list"),
    (b"partiton: gpu\n", "unknown key 'partiton'; the Slurm launcher takes: submitit_folder, timeout_min, "),
])
def test_a_bad_slurm_site_file_is_one_line_naming_the_file(tmp_path, monkeypatch, content, problem):
    site = tmp_path / "conf" / "site" / "slurm.yaml"
    site.parent.mkdir(parents=True)
    site.write_bytes(content)
    monkeypatch.setenv("DIFFSENS_CONFIG_DIR", str(tmp_path / "conf"))
    r = diffsens("run", "-m", "experiment=toy2d", "size=tiny", "hydra/launcher=slurm", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith(f"diffsens: error: {site}: {problem}"), r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "multirun").exists()


def test_a_typo_in_one_value_of_a_slurm_sweep_submits_nothing(tmp_path):
    r = diffsens("run", "-m", "experiment=toy2d", "size=tiny", "hydra/launcher=slurm", "solver.step_size=0.1,fast",
                 cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("diffsens: error: solver.step_size: must be null or a number, got 'fast' "
                        "(sweep job #1 of 2: solver.step_size=fast; no job was launched)\n")
    assert not list(tmp_path.iterdir())  # no multirun folder, no .submitit folder


# -- a sweep as separate processes ---------------------------------------------------

def test_a_submitit_sweep_runs_jobs_as_processes_that_share_the_stage_cache(tmp_path):
    """Two jobs of tiny digits_typography through submitit's local executor, one CPU each:
    each writes its run directory from a process of its own, with one torch thread; the
    base model they both need is trained once (one job trains it, the other waits on the
    lock and reuses it), in the cache both resolved to the same absolute path."""
    r = subprocess.run([sys.executable, "-m", "diffsens_cli", "run", "-m", "experiment=digits_typography",
                        "size=tiny", "solver.progress=false", "predict.grid_samples=1,2", "hydra.sweep.dir=sweep",
                        "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1",
                        "hydra.launcher.timeout_min=10"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = [json.loads((tmp_path / "sweep" / str(j) / "summary.json").read_text()) for j in (0, 1)]
    for summary in summaries:
        assert summary["threads"] == {"threads": 1, "source": "hydra.launcher.cpus_per_task",
                                      "visible_cpus": visible_cpus()}
    pids = {s["process"]["pid"] for s in summaries}
    assert len(pids) == 2 and os.getpid() not in pids
    trained = [[s["reused"] for s in summary["stages"] if s["stage"] == "train_base"] for summary in summaries]
    assert sum(not reused for job in trained for reused in job) == 1 and all(trained)  # trained once, read by both
    stage_dirs = {yaml.safe_load((tmp_path / "sweep" / str(j) / "config.yaml").read_text())["stages"]["dir"]
                  for j in (0, 1)}
    assert stage_dirs == {str(tmp_path / "outputs" / "stages")}
    assert len(list((tmp_path / "outputs" / "stages" / "train_base").glob(f"*/{DONE}"))) == 1
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))


# -- a stage cache shared by jobs that die -------------------------------------------

HOLD_A_STAGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from diffsens_cli.stages import StageCache

    def work(path: Path) -> None:
        (path / "partial.txt").write_text("begun")
        time.sleep(600)

    StageCache(sys.argv[1]).run("s", 1, work)
""")


def test_a_killed_job_leaves_no_finished_stage_and_no_lock_that_blocks(tmp_path):
    """A job killed with SIGKILL while it computes a stage (its lock held): the stage has no
    done.json, and the next job takes the lock at once, finds what the dead one began,
    and finishes the stage."""
    job = subprocess.Popen([sys.executable, "-c", HOLD_A_STAGE, str(tmp_path)])
    partial = StageCache(tmp_path).path("s", 1) / "partial.txt"
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert partial.exists() and job.poll() is None
    job.send_signal(signal.SIGKILL)
    job.wait(30)
    assert not (partial.parent / DONE).exists()

    found: list[str] = []
    start = time.perf_counter()
    path = StageCache(tmp_path).run("s", 1, lambda p: found.append((p / "partial.txt").read_text()))
    assert time.perf_counter() - start < 5
    assert found == ["begun"] and (path / DONE).is_file()


def test_the_lock_file_outlives_its_holder_so_every_job_locks_the_same_file(tmp_path):
    """Lock files are kept after release: removing one would let a waiter whose (NFS-cached)
    directory entry still names the old file hold its lock while a newcomer locks a new one."""
    path = StageCache(tmp_path).path("s", 1)
    lock = path.parent / f".{path.name}.lock"
    StageCache(tmp_path).run("s", 1, lambda p: (p / "a").write_text("1"))
    inode = lock.stat().st_ino
    StageCache(tmp_path, force=["s"]).run("s", 1, lambda p: (p / "a").write_text("2"))
    assert lock.stat().st_ino == inode and (path / "a").read_text() == "2"


def test_a_waiter_whose_lock_file_was_removed_takes_the_new_one(tmp_path):
    """A holder removes the lock file as it releases it (an older version, or a hand), and
    a newcomer locks a new file there: the waiter, woken on the removed file, waits for
    the newcomer instead of computing the stage beside it."""
    path = StageCache(tmp_path).path("s", 1)
    lock_path = path.parent / f".{path.name}.lock"
    lock_path.parent.mkdir(parents=True)
    old = open(lock_path, "a")  # noqa: SIM115
    fcntl.flock(old, fcntl.LOCK_EX)
    ran = threading.Event()
    waiter = threading.Thread(target=lambda: StageCache(tmp_path).run("s", 1, lambda p: ran.set()))
    waiter.start()
    time.sleep(0.3)  # the waiter is blocked on the old file
    lock_path.unlink()
    new = open(lock_path, "a")  # noqa: SIM115
    fcntl.flock(new, fcntl.LOCK_EX)
    old.close()
    assert not ran.wait(0.5)  # woken on the removed file, it went on to wait for the new one
    new.close()
    waiter.join(10)
    assert ran.is_set()


def test_a_cache_on_a_file_system_without_locks_stops_in_one_line(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(DiffsensError, match=rf"^stages.dir: {tmp_path} has no file locks \(No locks available\)"):
        StageCache(tmp_path).arrays("s", 1, lambda: {})


MOUNTS = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
29 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 29 0:50 / /home rw,relatime - nfs4 srv:/home rw,vers=4.2,local_lock=none,addr=10.0.0.1
41 29 0:51 / /scratch rw,relatime - nfs srv:/scratch rw,vers=3,nolock,local_lock=all
42 41 0:52 / /scratch/fast rw - lustre 10.0.0.2@o2ib:/fs rw,flock
43 29 0:53 / /lus rw - lustre 10.0.0.2@o2ib:/fs rw,localflock
44 29 0:54 / /lus2 rw - lustre 10.0.0.2@o2ib:/fs rw
45 29 0:55 / /my\\040data rw - nfs srv:/d rw,local_lock=flock
"""


@pytest.mark.parametrize("path,problem", [
    ("/tmp/x", None),
    ("/home/me/outputs/stages", None),
    ("/scratch/me/stages", "nfs at /scratch is mounted with nolock: its locks are local to this node"),
    ("/scratch/fast/stages", None),  # the longest mount point decides
    ("/scratchy/stages", None),
    ("/lus/stages", "lustre at /lus is mounted with localflock: its locks are local to this node"),
    ("/lus2/stages", "lustre at /lus2 is mounted with neither flock nor localflock: it has no locks"),
    ("/my data/stages", "nfs at /my data is mounted with local_lock=flock: its locks are local to this node"),
])
def test_the_mount_table_says_whether_the_cache_locks_hold_across_nodes(path, problem):
    assert lock_scope(Path(path), MOUNTS) == problem


# -- SIGTERM mid-training ------------------------------------------------------------

TRAIN = ["train", "size=tiny", "train.steps=120", "train.checkpoint_every=10", "sample.num_images=0",
         "train.progress=false"]


def test_a_job_killed_with_sigterm_mid_training_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """``diffsens train`` in a process of its own, SIGTERM once its first checkpoint is
    written: it saves the step it ended, exits 143 with one line, and the same command
    finishes to a model whose safetensors are byte for byte those of a run never stopped."""
    straight = diffsens(*TRAIN, "hydra.run.dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "-m", "diffsens_cli", *TRAIN, "hydra.run.dir=stopped"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    checkpoints = tmp_path / "stopped" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert [line for line in err.splitlines() if line.startswith("diffsens:")] == [
        f"diffsens: terminated (SIGTERM) during the run into {tmp_path / 'stopped'}; run the same command again "
        "to resume (finished stages and training checkpoints are kept)"]
    steps = [int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*")]
    assert 10 <= max(steps) < 120 and not (tmp_path / "stopped" / "model").exists()

    resumed = diffsens(*TRAIN, "hydra.run.dir=stopped", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    weights = sorted((tmp_path / "straight" / "model").rglob("*.safetensors"))
    assert weights
    for path in weights:
        assert (tmp_path / "stopped" / path.relative_to(tmp_path / "straight")).read_bytes() == path.read_bytes()


# -- one experiment split over jobs --------------------------------------------------

SPLIT = ["experiment=digits_typography", "size=tiny", "solver.progress=false", "shard.block=1"]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit the same values (a NaN where the other has a NaN)."""
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def test_a_three_way_sharded_run_gives_the_arrays_of_the_unsharded_run(tmp_path):
    """Tiny digits_typography (4 model samples in blocks of 1) as 3 jobs, each with its
    share of the 12 block stages (sensitivity, retrained and fine-tuned samples) and no
    figures; the end of the sweep assembles it. Against the unsharded run with its own
    cache: every array bit for bit the same, and the assembly computed no stage."""
    whole = diffsens("run", *SPLIT, "stages.dir=cache_whole", "hydra.run.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    split = diffsens("run", "-m", *SPLIT, "stages.dir=cache_split", "shard.count=3", "shard.index=range(0,3)",
                     "stages.force=[samples_finetune]", "hydra.sweep.dir=sweep", cwd=tmp_path)  # forced once
    assert split.returncode == 0, split.stderr[-2000:]

    computed: dict[str, list[int]] = {}
    for j in range(3):  # the 12 block stages are numbered on from one stage to the next: 4 each
        summary = json.loads((tmp_path / "sweep" / str(j) / "summary.json").read_text())
        assert summary["shard"] == {"index": j, "count": 3, "block": 1, "stages_computed": 4, "stages_in_all": 12}
        assert not list((tmp_path / "sweep" / str(j)).glob("*.png"))
        for s in summary["stages"]:
            if not s["reused"] and s["stage"] in ("sensitivity", "samples_retrain", "samples_finetune"):
                computed.setdefault(s["stage"], []).append(j)
    assert sorted(sorted(jobs) for jobs in computed.values()) == [[0, 0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 2]]

    assembled = tmp_path / "sweep" / "assembled"
    summary = json.loads((assembled / "summary.json").read_text())
    assert all(s["reused"] for s in summary["stages"] if not s["stage"].startswith("ot_"))
    assert summary["metrics"] == json.loads((tmp_path / "whole" / "summary.json").read_text())["metrics"]
    ours, theirs = _arrays(assembled / "arrays.npz"), _arrays(tmp_path / "whole" / "arrays.npz")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert _same(ours[key], theirs[key]), key
    assert sorted(p.name for p in assembled.glob("*.png")) == sorted(p.name for p in (tmp_path / "whole").glob("*.png"))

    # in one block of all 4 samples: the same numbers to float32 round-off (each block's probes are keyed by
    # its rows; a batch of 4 runs other convolution kernels than a batch of 1, and their last-bit differences
    # grow along the path: measured |a - b| / |b| of 4.5e-7 for psi, 2.7e-7 for samples, 0 for logp; single
    # small entries differ by up to 5.5e-5 relative, so the whole array's norm is compared)
    one = diffsens("run", *SPLIT, "shard.block=256", "stages.dir=cache_whole", "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    in_one = _arrays(tmp_path / "one" / "arrays.npz")
    for key in ("z0", "samples", "logp", "psi", "retrain/samples", "finetune/samples"):
        assert np.linalg.norm(in_one[key] - theirs[key]) <= 1e-5 * np.linalg.norm(theirs[key]), key


def test_the_shards_of_a_counterfactual_run_split_the_influence_and_predictions(tmp_path):
    """counterfactual_closed_form as 2 jobs: each computes its own model sample's influence
    first and its share of the predictions; the assembly run by hand (the unsharded
    command) computes no influence or prediction stage and gives the arrays of a run
    never split."""
    common = ["experiment=counterfactual_closed_form", "size=tiny", "solver.progress=false"]
    # run one after the other, job 0 finds sample 1's influence not yet computed and computes it too
    # and the staged score sets of both (ours_loss), which job 1 then finds
    for j, computed in ((0, ["influence", "influence", "attribution", "attribution", "predictions_counterfactual"]),
                        (1, ["predictions_counterfactual"])):
        r = diffsens("run", *common, "shard.count=2", f"shard.index={j}", f"hydra.run.dir=shard{j}",
                     "stages.dir=cache_split", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        stages = json.loads((tmp_path / f"shard{j}" / "summary.json").read_text())["stages"]
        assert [s["stage"] for s in stages if not s["reused"]] == computed, stages
    assembled = diffsens("run", *common, "hydra.run.dir=assembled", "stages.dir=cache_split", cwd=tmp_path)
    whole = diffsens("run", *common, "hydra.run.dir=whole", "stages.dir=cache_whole", cwd=tmp_path)
    assert assembled.returncode == whole.returncode == 0, assembled.stderr[-2000:] + whole.stderr[-2000:]
    assert all(s["reused"] for s in json.loads((tmp_path / "assembled" / "summary.json").read_text())["stages"])
    ours, theirs = _arrays(tmp_path / "assembled" / "arrays.npz"), _arrays(tmp_path / "whole" / "arrays.npz")
    assert ours.keys() == theirs.keys() and all(_same(ours[k], theirs[k]) for k in ours)


def test_the_jobs_shares_partition_every_list_and_number_on_across_lists():
    """Three lists of 4 stages over 3 jobs: each stage is one job's, and numbering the
    lists on from each other gives every job 4 (numbering each from 0 gave 6, 3, 3)."""
    lists = [[(k, i) for i in range(4)] for k in range(3)]
    shares = []
    for index in range(3):
        shard, first = Shard(index, 3, block=256), 0
        share = []
        for items in lists:
            share += shard.mine(items, first)
            first += len(items)
        shares.append(share)
    assert sorted(x for share in shares for x in share) == sorted(x for items in lists for x in items)
    assert [len(share) for share in shares] == [4, 4, 4]
    assert Shard(0, 1, block=256).mine(lists[0], first=5) == lists[0]


@pytest.mark.parametrize("path", ["/runs/plain", "/a b,c/x", "/it's", "/back\\slash", "/odd\\'quote", "/end\\",
                                  "/two\\\\", "=[]{}():"])
def test_the_assembly_passes_any_run_folder_to_hydra_as_itself(path):
    """The folder the assembly writes to goes through Hydra's override grammar intact."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"hydra.run.dir={hydra_quoted(path)}"])
    assert override.value() == path and not override.is_sweep_override()


def test_shard_values_written_as_floats_assemble_like_whole_ones(tmp_path):
    """``shard.count=2.0 shard.index=0.0,1.0`` is read as the checks read it (2.0 is 2):
    both shards run and the sweep's end assembles them."""
    r = diffsens("run", "-m", "experiment=influence_closed_form", "size=tiny", "solver.progress=false",
                 "shard.count=2.0", "shard.index=0.0,1.0", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "sweep" / "assembled" / "summary.json").read_text())["metrics"]["influence"]


@pytest.mark.parametrize("overrides,expected", [
    (["shard.count=2.5", "shard.index=0,1"], "shard.count: must be a whole number, got 2.5"),
    (["shard.count=2,3", "shard.index=0,1"], "shard.count: one value per sweep, got [2, 3]"),
])
def test_an_assembly_that_fails_is_one_line_and_a_non_zero_exit(tmp_path, capsys, overrides, expected):
    """Hydra only logs a callback's exception (the sweep would exit 0 having assembled
    nothing): the assembly's own failures end the process with one line instead."""
    config = OmegaConf.create({"hydra": {"overrides": {"task": overrides}, "sweep": {"dir": str(tmp_path)}},
                               "shard": {"count": 1}})
    with pytest.raises(SystemExit) as stopped:
        AssembleShards().on_multirun_end(config)
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"diffsens: error: assembling the shards: {expected}\n"


def test_shards_out_of_range_or_of_an_experiment_that_does_not_split_are_refused(cli_error):
    assert cli_error(["run", "experiment=digits_influence", "size=tiny", "shard.count=3", "shard.index=3"]) == \
        "shard.index: must be in 0..2 (shard.count=3), got 3"
    assert cli_error(["run", "experiment=toy2d", "size=tiny", "shard.count=2"]) == (
        "shard.count: the task toy2d of toy2d does not split over jobs (these do: attribute_sensitivity, "
        "counterfactual, influence, predict_change)")
    swept = cli_error(["run", "-m", "experiment=digits_influence", "size=tiny", "shard.count=2", "shard.index=0,1,2"])
    assert swept.startswith("shard.index: must be in 0..1 (shard.count=2), got 2 (sweep job #2")


def _submitit_task(cwd: Path) -> int | None:
    """The pid of the process submitit's local executor runs the job in (under ``cwd``), if any."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"submitit.core._submit" in (proc / "cmdline").read_bytes() \
                    and Path(os.readlink(proc / "cwd")) == cwd:
                return int(proc.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_submitit_job_sent_sigusr2_mid_training_is_requeued_and_resumes_to_the_same_weights(tmp_path):
    """What Slurm does before a time limit, on this machine: SIGUSR2 to a training job of a
    submitit_local sweep once its first checkpoint is written.  The job checkpoints the
    step it ended, submitit requeues it, the requeued job resumes, and the model is byte
    for byte that of a run never stopped."""
    straight = diffsens(*TRAIN, "hydra.run.dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-m", "diffsens_cli", "train", "-m", *TRAIN[1:], "hydra.sweep.dir=sweep",
                             "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    checkpoints = tmp_path / "sweep" / "0" / "checkpoints"
    deadline = time.time() + 300
    while not list(checkpoints.glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    task = _submitit_task(tmp_path)
    assert task is not None and proc.poll() is None, proc.communicate()[0][-3000:]
    os.kill(task, signal.SIGUSR2)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    assert "preempted" in logs and "Requeued job" in logs and "Job completed successfully" in logs, logs[-3000:]
    weights = sorted((tmp_path / "straight" / "model").rglob("*.safetensors"))
    assert weights
    for path in weights:
        assert (tmp_path / "sweep" / "0" / path.relative_to(tmp_path / "straight")).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_written_whole_get_the_permissions_the_umask_gives(tmp_path, umask):
    """A stage cache or report shared by a group: atomically written files are readable as the umask says,
    not 0600 like the temporary file they were written through."""
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "shared.json", lambda f: f.write("{}"), "w")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o666 & ~umask
