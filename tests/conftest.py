"""Shared test fixtures, and one CPU thread per pytest-xdist worker."""

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: with torch's default of a thread per core each,
    # two workers would run four threads on two cores and wait on each other
    # (diffsens_cli/threads.py). Runs (threads.configure) and subprocesses read it too.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: a worker per core this process may run on (xdist's own count, from
    psutil, is the host's cores, not a container's share)."""
    from diffsens_cli.threads import visible_cpus

    return visible_cpus()


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (finite differences and closed forms),
    restored afterwards so that other modules see float32 as users do."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def cli_error(tmp_path):
    """``cli_error(args, cwd=tmp_path)``: run ``diffsens <args>`` in this process (no
    interpreter start-up: bad-input checks cost milliseconds), check exit status 2, one
    stderr line and (unless ``after_run_dir``: a check that needs the loaded data) no
    outputs/, and return that line without ``diffsens: error: ``."""
    from helpers import diffsens

    def run(args: list[str], cwd=None, after_run_dir: bool = False) -> str:
        cwd = cwd or tmp_path
        r = diffsens(*args, cwd=cwd)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, lines
        assert after_run_dir or not (cwd / "outputs").exists()
        return lines[0].removeprefix("diffsens: error: ")

    return run


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """Tiny copies of the published data sets in their own formats, for runs of the
    experiments that read them: ``<root>/mnist`` (24 IDX images, 28x28), ``<root>/tmnist``
    (20 CSV rows) and ``<root>/celeba`` (12 JPEGs of CelebA's size 178x218, with the
    attributes Male, Young, Bald, Goatee, Smiling, Eyeglasses, each in both splits: images
    1-8 train, 9-12 test; the train images with Male and not Young are 2 and 6),
    ``<root>/cifar10`` (5 training batches of 6 images, 32x32 RGB, 10 labels) and
    ``<root>/cifar10_model`` (a tiny pretrained UNet for CIFAR-10 images, save_pretrained layout)."""
    import gzip
    import pickle
    import struct

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def idx(path, array):
        raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(raw)

    (root / "mnist").mkdir()
    idx(root / "mnist" / "train-images-idx3-ubyte", rng.integers(0, 256, (24, 28, 28), dtype=np.uint8))
    idx(root / "mnist" / "train-labels-idx1-ubyte", rng.integers(0, 10, 24).astype(np.uint8))

    (root / "tmnist").mkdir()
    header = "names,labels," + ",".join(map(str, range(1, 785)))
    rows = [f"Font-{i},{i % 10}," + ",".join(map(str, rng.integers(0, 256, 784))) for i in range(20)]
    (root / "tmnist" / "TMNIST_Data.csv").write_text("\n".join([header, *rows]) + "\n")

    celeba = root / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    names = ["Male", "Young", "Bald", "Goatee", "Smiling", "Eyeglasses"]
    lines = ["12", " ".join(names)]
    partition = []
    for i in range(12):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(celeba / "img_align_celeba" / name)
        has = [i % 2, (i // 2) % 2, i in (2, 8), i in (3, 9), i in (0, 4, 10), i in (5, 11)]
        values = [1 if h else -1 for h in has]
        lines.append(name + " " + " ".join(f"{v:2d}" for v in values))
        partition.append(f"{name} {0 if i < 8 else 2}")
    (celeba / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (celeba / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")

    batches = root / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for b in range(1, 6):
        batch = {b"labels": [int(v) for v in rng.integers(0, 10, 6)],
                 b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}
        with open(batches / f"data_batch_{b}", "wb") as f:
            pickle.dump(batch, f, protocol=2)

    from diffsens_cli.core.schedule import VPDiscrete
    from diffsens_cli.models.pretrained import save_pretrained
    from diffsens_cli.models.unet import build_network_model

    unet = {"kind": "unet", "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": 4, "seed": 0}
    save_pretrained(build_network_model(unet, (3, 32, 32), VPDiscrete(), forward_ad=False), root / "cifar10_model")
    own_model_and_images(root)
    return root


def own_model_and_images(root):
    """What a user of docs/own_model.md brings: ``<root>/own_pipeline`` (a DDPMPipeline
    of a tiny 3x8x8 UNet, as ``save_pretrained`` writes it), ``<root>/own_images`` (its
    training images: PNGs in two class folders, cats/ and dogs/, 6 each) and
    ``<root>/own_S`` (4 JPEGs, a set S to fine-tune on)."""
    import numpy as np
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    rng = np.random.default_rng(1)
    torch.manual_seed(1234)  # not the run's seed 0, which a retraining initialises from
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(root / "own_pipeline")
    for label in ("cats", "dogs"):
        (root / "own_images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "own_images" / label / f"{label[:-1]}_{i}.png")
    (root / "own_S").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "own_S" / f"s_{i}.jpg")


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(experiment, *overrides) -> (run_dir, summary)``: the experiment at tiny
    size, run once per test session for every test (and every xdist worker) that asks for
    the same arguments, each in a folder of its own (its stage cache is
    ``run_dir.parent / "outputs" / "stages"``). Read-only: a test that changes a run, or
    needs a fresh cache (reuse, resume), runs its own."""
    import matplotlib.pyplot as plt
    from helpers import diffsens

    from diffsens_cli.stages import stage_key

    # xdist's workers share the session's base folder's parent; a lone process has its own
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_runs"
    root.mkdir(exist_ok=True)

    def run(experiment: str, *overrides: str) -> tuple[Path, dict]:
        key = stage_key([experiment, *overrides])
        cwd, out, failed = (root / f"{experiment}-{key}", root / f"{experiment}-{key}" / "run",
                            root / f"{experiment}-{key}.failed")
        with open(root / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it: wait for it
            assert not failed.exists(), failed.read_text()  # failed once: say why, do not run it again
            if not (out / "summary.json").exists():
                assert torch.get_default_dtype() == torch.float32, "a shared run runs as users run it"
                shutil.rmtree(cwd, ignore_errors=True)
                cwd.mkdir()
                r = diffsens("run", f"experiment={experiment}", "size=tiny", "hydra.run.dir=run",
                             "solver.progress=false", *overrides, cwd=cwd)
                if r.returncode != 0:
                    failed.write_text(r.stderr[-3000:])
                assert r.returncode == 0, r.stderr[-3000:]
                assert plt.get_fignums() == []  # every figure closed once saved (a sweep's jobs share a process)
        return out, json.loads((out / "summary.json").read_text())

    return run

