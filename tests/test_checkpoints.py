"""Training checkpoints a resume cannot trust: files that would run code if unpickled,
truncated or swapped files, and checkpoints trained with other settings."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import diffsens, train_settings_with

from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.models.network import FourierMLP, NetworkScore
from diffsens_cli.stages import file_digest
from diffsens_cli.training.trainer import MANIFEST, Trainer

FILES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "ema.safetensors", "rng-0.json", "losses.npy",
         MANIFEST]


def _trainer(root: Path) -> Trainer:
    torch.manual_seed(0)
    model = NetworkScore(FourierMLP(3, hidden=16, num_frequencies=8), VPLinear())
    target = GaussianMixture(torch.tensor([[-1.0] * 3, [1.0] * 3]), torch.tensor(0.1), torch.ones(2))
    settings = train_settings_with(steps=6, batch_size=32, lr=1e-2, checkpoint_every=3, progress=False, ema_decay=0.9)
    return Trainer(model, target, (3,), settings, root / "checkpoints")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """A run of 6 steps with checkpoints at 3 and 6, and its final sampling weights."""
    root = tmp_path_factory.mktemp("trained")
    trainer = _trainer(root)
    trainer.train()
    return root, [p.detach().clone() for p in trainer.sampling_model().net.parameters()]


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run to spoil."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


class Evil:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest's checksums to match the files, as someone who can write the directory could."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {name: file_digest(ckpt / name) for name in manifest["files"]}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _resumed(run: Path, capsys) -> tuple[Trainer, list[str]]:
    trainer = _trainer(run)
    trainer.resume()
    return trainer, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_pickle_in_place_of_any_checkpoint_file_never_runs(run, tmp_path, capsys, name, form):
    """Each file a resume reads, replaced by a pickle whose loading would touch MARKER (and
    the checksums resealed to match): nothing runs, the checkpoint is set aside with one
    warning line, and the resume falls back to the one before."""
    marker = tmp_path / "MARKER"
    newest = run / "checkpoints" / "step-00000006"
    with open(newest / name, "wb") as f:
        pickle.dump(Evil(marker), f) if form == "pickle" else torch.save(Evil(marker), f)
    if name != MANIFEST:
        _reseal(newest)

    trainer, err = _resumed(run, capsys)
    assert not marker.exists()
    assert trainer.step == 3 and [p.name for p in trainer.checkpoints()] == ["step-00000003"]
    assert len(err) == 1 and err[0].startswith(f"diffsens: warning: checkpoint {newest} fails its check: "), err
    assert "Re-running" not in err[0]  # torch's advice to load with weights_only=False is not passed on
    if name.endswith(".pt") and form == "torch.save":
        assert "torch.load(weights_only=True) refused it, nothing of it was run: " in err[0] and "posix" in err[0]
    aside = [p.name for p in (run / "checkpoints").glob("corrupt-step-00000006-*")]
    assert len(aside) == 1 and sorted(p.name for p in (run / "checkpoints" / aside[0]).iterdir()) == sorted(FILES)


@pytest.mark.parametrize("spoil", ["truncate", "swap", "delete"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(run, trained, capsys, spoil):
    """A truncated file, a valid file of the other checkpoint, or a missing file: the
    newest checkpoint fails its checksums, and training from the one before ends bitwise
    where the uninterrupted run did."""
    ckpts = run / "checkpoints"
    target = ckpts / "step-00000006" / ("model.safetensors" if spoil != "swap" else "optimizer.pt")
    if spoil == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif spoil == "swap":
        shutil.copy(ckpts / "step-00000003" / "optimizer.pt", target)
    else:
        target.unlink()

    trainer, err = _resumed(run, capsys)
    problem = "is missing" if spoil == "delete" else f"does not match its checksum in {MANIFEST}"
    assert err == [f"diffsens: warning: checkpoint {ckpts / 'step-00000006'} fails its check: "
                   f"{target.name} {problem}; set aside as {next(ckpts.glob('corrupt-*')).name}"]
    assert trainer.step == 3
    trainer.train()
    assert trainer.step == 6 and [p.name for p in trainer.checkpoints()] == ["step-00000003", "step-00000006"]
    for a, b in zip(trained[1], trainer.sampling_model().net.parameters()):
        assert torch.equal(a, b)


def test_no_usable_checkpoint_starts_from_step_zero_untouched(run, tmp_path, capsys):
    """Both checkpoints fail to load their optimizer state: each is set aside, and training
    starts from step 0 with the initial weights."""
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        torch.save(Evil(tmp_path / "MARKER"), ckpt / "optimizer.pt")
        _reseal(ckpt)

    trainer, err = _resumed(run, capsys)
    assert len(err) == 3 and err[2] == (f"diffsens: warning: no usable checkpoint is left in {run / 'checkpoints'}: "
                                        "training starts from step 0")
    assert trainer.step == 0 and trainer.losses == [] and trainer.checkpoints() == []
    fresh = _trainer(tmp_path / "fresh")
    for a, b in zip(fresh.net.parameters(), trainer.net.parameters()):
        assert torch.equal(a, b)
    assert not (tmp_path / "MARKER").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    tiny = ["solver.progress=false", "train.steps=3", "train.batch_size=8", "train.checkpoint_every=2",
            "sample.num_images=2", "sample.num_steps=2", "dataset.limit=64"]
    return diffsens("train", *tiny, *args, cwd=cwd)


def test_resuming_with_other_settings_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    """A second `diffsens train` into the same directory with another data set and lr:
    one line naming what differs and how to start afresh; every file of the run directory
    unchanged (config.yaml, summary.json, Hydra's .hydra/ record).  Bookkeeping keys (and
    sample.*) may change."""
    out = tmp_path / "run"
    r = _cli(f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    r = _cli(f"hydra.run.dir={out}", "dataset=typography", "train.lr=0.5", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"diffsens: error: checkpoint {out / 'checkpoints' / 'step-00000003'} "
                               "was trained with other settings: ")
    assert "dataset.kind: 'digits' -> 'typography'" in lines[0] and "train.lr: 0.001 -> 0.5" in lines[0]
    assert lines[0].endswith(f"to start afresh, use another hydra.run.dir or delete {out / 'checkpoints'}")
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # .hydra/ too

    r = _cli(f"hydra.run.dir={out}", "train.checkpoint_every=1", "train.keep_checkpoints=3", "sample.num_images=1",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["metrics"]["steps"] == 3


def test_a_sound_checkpoint_that_does_not_fit_stops_in_one_line_and_stays(run, tmp_path):
    """Weights of another shape, resealed: the files load, but the model cannot take them.
    That is not corruption to fall back from silently: one line, the checkpoint stays where
    it is, and nothing of it is kept by the trainer."""
    from safetensors.torch import save_file

    from diffsens_cli.errors import DiffsensError

    newest = run / "checkpoints" / "step-00000006"
    save_file({"other": torch.zeros(2, 2)}, newest / "model.safetensors")
    _reseal(newest)
    trainer = _trainer(run)
    initial = [p.detach().clone() for p in trainer.net.parameters()]
    with pytest.raises(DiffsensError) as e:
        trainer.resume()
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"checkpoint {newest} passed its checks but cannot be resumed here (RuntimeError: ")
    assert [p.name for p in trainer.checkpoints()] == ["step-00000003", "step-00000006"]
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(initial, trainer.net.parameters()))


def test_a_training_that_diverges_ends_in_one_line_and_saves_no_model(tmp_path):
    """``train.lr=1e30``: the run stops with one ``diffsens: error:`` line naming the step
    and the setting, exit status 2, and no model (or samples) of non-finite weights."""
    out = tmp_path / "run"
    r = _cli(f"hydra.run.dir={out}", "train.lr=1e30", cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("diffsens: error: training: the ") and "lower train.lr (now 1e+30)" in lines[0]
    assert not (out / "model").exists() and not (out / "summary.json").exists()
