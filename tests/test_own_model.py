"""Your model, your images (docs/own_model.md): a diffusers pipeline the user brings is the
base model of every image experiment (never trained here), fine-tuning starts from its
weights and retraining from fresh weights of its architecture; and a stage reading the
user's own files is keyed by their fingerprint, so it does not outlive a change to them."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from helpers import DATA_ROOTS, REPO, diffsens, run_tiny

from diffsens_cli.data import data_depends
from diffsens_cli.errors import plain
from diffsens_cli.models.pretrained import load_pretrained


def _weights(model_dir: Path) -> torch.Tensor:
    net = load_pretrained(model_dir, forward_ad=False).net.model
    return torch.cat([p.detach().flatten().double() for p in net.parameters()])


def test_fine_tuning_starts_from_the_users_weights_and_retraining_from_its_architecture(tmp_path, fake_data):
    roots = [a.format(data=fake_data) for a in DATA_ROOTS["own_predict"]]
    run_tiny(tmp_path, "run", "own_predict", *roots, "finetune.lr=1e-9", "train.lr=1e-3")
    stages = tmp_path / "outputs" / "stages"
    assert not (stages / "train_base").exists()  # the user's model is the base
    mine = _weights(fake_data / "own_pipeline")
    (finetuned,), (retrained,) = (list((stages / f"train_{m}").glob("*/model")) for m in ("finetune", "retrain"))
    # 3 steps of AdamW at lr 1e-9 move no weight by more than about 3e-9: from the user's weights
    assert (_weights(finetuned) - mine).abs().max() < 1e-7
    # retrained from fresh weights of the same architecture: far from the user's
    fresh = _weights(retrained)
    assert fresh.shape == mine.shape and (fresh - mine).abs().max() > 0.05
    config = json.loads((retrained / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [8, 16] and config["in_channels"] == 3


def test_the_users_model_is_keyed_by_its_files_and_the_class_it_is_asked_for(fake_data, tmp_path):
    """A class-conditional model's samples are its class's: the base model's key names
    it; an unconditional model's key is its files' alone."""
    from hydra import compose, initialize_config_module

    from diffsens_cli.pipelines.shared.image_stages import ImageStages
    from diffsens_cli.stages import StageCache, checksums, stage_key

    roots = [a.format(data=fake_data) for a in DATA_ROOTS["own_influence"]]
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        keys = [ImageStages(compose("config", overrides=["experiment=own_influence", *roots, f"model.class_label={c}"]),
                            StageCache(tmp_path)).base()[0] for c in ("null", 3, 5)]
    assert keys[0] == f"pretrained/{stage_key(checksums(fake_data / 'own_pipeline'))}"
    assert len(set(keys)) == 3


def test_streamed_training_images_give_the_resident_runs_tables(tmp_path, fake_data):
    """influence.train_block=5 (12 training images in 3 blocks) against null (all on the
    device): the same samples, scores to float32 round-off, and so the same tables."""
    roots = [a.format(data=fake_data) for a in DATA_ROOTS["own_influence"]]
    runs = [run_tiny(tmp_path, f"block_{b}", "own_influence", *roots, f"influence.train_block={b}",
                     f"stages.dir=stages_{b}")[0] for b in ("null", 5)]
    arrays = [dict(np.load(r / "arrays.npz")) for r in runs]
    np.testing.assert_array_equal(arrays[0]["samples"], arrays[1]["samples"])
    for key in ("influence/ours_exact/scores", "influence/ours_clamped/scores", "influence/ours_loss/scores"):
        np.testing.assert_allclose(arrays[1][key], arrays[0][key], rtol=1e-5, err_msg=key)
    memory = [json.loads((r / "summary.json").read_text())["metrics"]["influence"]["memory"] for r in runs]
    assert [m["streamed_block"] for m in memory] == [None, 5]
    assert memory[0]["training_images_gb"] == 12 * 3 * 8 * 8 * 4 / 1e9


def test_a_stage_reading_the_users_folder_is_keyed_by_its_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i}.png")
    cfg = {"kind": "image_folder", "root": str(folder), "channels": None, "image_size": None, "limit": None,
           "seed": 0}
    before = data_depends(cfg)
    assert data_depends(cfg) == before  # the same files: the same key
    os.utime(folder / "1.png", ns=(0, 10**18))  # rewritten in place: another modification time
    assert data_depends(cfg) != before
    Image.new("RGB", (4, 4)).save(folder / "3.png")  # one more image
    assert data_depends(cfg)["files"]["count"] == 4
    # S from the user's folder, nested in the perturbation: stamped there too
    perturbation = {"kind": "image_set", "source": cfg}
    assert data_depends(perturbation, "perturbation")["source"]["files"] == data_depends(cfg)["files"]
    # the published and embedded data sets' keys are their settings, as before
    digits = {"kind": "digits", "root": None, "image_size": None, "limit": 64, "seed": 0}
    assert data_depends(digits) == plain(digits)


def walkthrough_commands() -> tuple[dict[str, str], list[list[str]]]:
    """docs/own_model.md's bash blocks: the variables they set and their ``diffsens``
    commands (continuation lines joined), as argument lists."""
    text = (REPO / "docs" / "own_model.md").read_text()
    variables, commands = {}, []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if len(words) == 1 and re.fullmatch(r"[A-Z]+=\S+", words[0]):
                name, value = words[0].split("=", 1)
                variables[name] = value
            elif words[:1] == ["diffsens"]:
                commands.append(words[1:])
    return variables, commands


def test_the_walkthrough_runs_as_written_and_names_the_images(tmp_path, fake_data):
    """Every command of docs/own_model.md on a tiny DDPMPipeline saved with
    save_pretrained and tiny image folders (conftest: own_model_and_images), at
    size=tiny and locally (Slurm's launcher replaced by the basic one): each finishes,
    and the tables and index.html name the training images by their file names."""
    variables, commands = walkthrough_commands()
    assert set(variables) == {"MODEL", "IMAGES", "QUERIES", "NEW"}
    mine = {"MODEL": fake_data / "own_pipeline", "IMAGES": fake_data / "own_images",
            "QUERIES": fake_data / "own_S", "NEW": fake_data / "own_S"}
    names = {p.relative_to(fake_data / "own_images").as_posix() for p in (fake_data / "own_images").rglob("*.png")}
    assert [c[:2] for c in commands] == [["run", "experiment=own_influence"], ["run", "experiment=own_influence"],
                                         ["run", "experiment=own_predict"], ["run", "-m"]]
    for k, words in enumerate(commands):
        args = [re.sub(r"\$([A-Z]+)", lambda m: str(mine[m.group(1)]), w) for w in words]
        args = [a.replace("hydra/launcher=slurm", "hydra/launcher=basic") for a in args]
        out = tmp_path / f"walk{k}"
        where = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
        r = diffsens(*args, "size=tiny", "solver.progress=false", f"{where}={out}", cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr[-3000:])
        run = out / "assembled" if "-m" in args else out
        summary = json.loads((run / "summary.json").read_text())
        if "experiment=own_predict" in args:
            assert summary["metrics"]["finetune"]["num_samples"] == 4
            continue
        tables = summary["metrics"]["tables"]
        asked = "+dataset@influence.queries=image_folder" in args
        expected = 4 if asked else 16 if "-m" in args else 2  # the queries, the sweep's samples, tiny's
        assert tables == [f"tables/{'query' if asked else 'sample'}_{i}.csv" for i in range(expected)]
        with open(run / tables[0], newline="") as f:
            rows = list(csv.DictReader(f))
        assert {row["name"] for row in rows} == names and [int(r["rank"]) for r in rows] == list(range(1, 13))
        page = (run / "index.html").read_text()
        top = summary["galleries"][0]["top"][0]
        assert top["name"] == rows[0]["name"] and f"{rows[0]['name']}<br>" in page
