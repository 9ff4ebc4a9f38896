"""The command line as a user meets it: every experiment composes and runs tiny, bad
input fails in one line, and the configs ship inside a non-editable install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from helpers import EXPERIMENTS, REPO, TINY, diffsens, diffsens_process
from hydra import compose, initialize_config_module

from diffsens_cli.builders import Components
from diffsens_cli.pipelines import check_task

# What each pipeline must leave in arrays.npz, finite.
ARRAYS = {"bench_engine": tuple(f"{m}/times_sensitivity" for m in ("mlp", "unet_digits", "unet_mnist")),
          "train": ("train_loss", "z0", "samples"),
          "gmm_score_error": ("z0", "psi_exact", "psi_learned", "eval_median_corr")}
ARRAYS["gmm_score_error_paper"] = ARRAYS["gmm_score_error"]
ARRAYS["fisher_ot_check"] = ("z0", "samples", "jacobian", "asymmetry", "eig_sym")
ARRAYS["gtv_proxy_variance"] = ("share", "trace_c", "axis", "points/hexagon")
ARRAYS["gtv_naive_sampler"] = ("hexagon/z0", "hexagon/naive", "hexagon/kde", "hexagon/pf_ode", "hexagon/effective_sde",
                               "hexagon/squared_deviation_by_steps", "hexagon/switched_by_draws")
ARRAYS["gtv_variance_prediction"] = ("hexagon/z0", "hexagon/predicted_per_draw", "hexagon/R1/empirical",
                                     "hexagon/learned/ends", "hexagon/learned/spread", "hexagon/learned/predicted")
ARRAYS["fisher_trace_chessboard"] = ("1.0/z", "1.0/exact", "1.0/vjp", "0.0/df_tm", "log_density/exact",
                                     "log_density/df_tm", "log_density/hutchinson_1")
ARRAYS["bench_paper_scale"] = ("digits/seconds_per_item/train", "celeba/seconds_per_item/vjp4",
                               "digits_typography/predicted_hours", "celeba_influence/predicted_hours")
ARRAYS["bench_train"] = ("old/losses", "new/losses", "bf16/losses", "old/seconds", "new/seconds")
ARRAYS["digits_psi_convergence"] = ("z0", "reference/psi", "reference/logp", "paper/psi_rel_diff")
ARRAYS["bench_influence"] = ARRAYS["bench_influence_faces"] = ("sizes", "speedup", "spearman", "reference_scores")
ARRAYS["influence_closed_form"] = ("z0", "samples", "train_index", "train_points", "influence/scores",
                                   "influence/ours_exact/scores", "influence/ours_clamped/scores",
                                   "influence/singular_vectors")
ARRAYS["counterfactual_closed_form"] = ARRAYS["digits_counterfactual"] = ARRAYS["mnist_counterfactual"] = (
    "base", "floor", "counterfactual/retrained", "counterfactual/predicted", "datamodel/retrained",
    "datamodel/predicted", "datamodel/predicted_l2kernel")
# Every influence run scores with clamped and exact weights (one pass); digits_influence with every method.
for _e in ("digits_influence", "lfw_influence", "celeba_influence", "digits_crossclass", "cifar10_crossclass",
           "own_influence"):
    ARRAYS[_e] = ("z0", "samples", "train_index", "influence/scores", "influence/ours_clamped/scores",
                  "influence/ours_exact/scores", "influence/ours_set/scores", "influence/ours_loss/scores",
                  "influence/l2/scores", "influence/singular_vectors", "influence/shown_psi")
ARRAYS["digits_influence"] += ("influence/feature/scores", "influence/dtrak/scores")
for _e in ("digits_typography", "mnist_tmnist", "celeba_oldman", "own_predict"):
    ARRAYS[_e] = ("z0", "samples", "psi", "logp", "retrain/change", "retrain/ot_rays", "finetune/change",
                  "finetune/ot_rays")
for _e in ("celeba_attributes", "celeba_attributes_paper"):
    ARRAYS[_e] = ("z0", "samples", "logp", *(f"psi/{k}" for k in ("Bright", "Dark", "High_Contrast", "Lit_From_Left")
                                            if _e == "celeba_attributes"))


# What every run directory must hold beyond its arrays: figures (PNG and PDF), but for the
# engine benchmark's tables; the forcing's weight counts at the top of the summary, for the
# tasks that report them there (influence and counterfactual keep theirs per sample).
TASKS_WITHOUT_FIGURES = ("bench_engine",)
TASKS_WITH_WEIGHTS = ("attribute_sensitivity", "first_order", "predict_change", "toy2d")


def test_every_experiment_has_tiny_settings():
    """size=tiny selects configs/experiment_size/tiny_<experiment>.yaml, which must exist
    for every experiment and change what it says (it is optional to Hydra)."""
    sized = sorted(p.stem.removeprefix("tiny_") for p in (REPO / "configs" / "experiment_size").glob("tiny_*.yaml"))
    assert sized == EXPERIMENTS
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        for experiment in EXPERIMENTS:
            full, tiny = (compose("config", overrides=[f"experiment={experiment}", f"size={size}"])
                          for size in ("full", "tiny"))
            assert full != tiny, experiment


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_config_composes_and_builds(experiment, fake_data):
    """Each experiment at its own settings; those reading data files are pointed at the
    fake copies (their folders are checked before a run starts)."""
    roots = [a.format(data=fake_data) for a in TINY[experiment] if ".root=" in a or ".path=" in a]
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *roots])
    assert cfg.task and (cfg.name == experiment or cfg.task == "train")
    check_task(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_tiny_run_writes_a_self_describing_directory(experiment, fake_data, shared_run):
    """Each pipeline end to end (the run other modules read too), and what it wrote."""
    out, summary = shared_run(experiment, *(a.format(data=fake_data) for a in TINY[experiment] if a != "size=tiny"))
    assert summary["metrics"] and summary["versions"]["torch"]
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        task = compose("config", overrides=[f"experiment={experiment}"]).task
    assert f"task: {task}\n" in (out / "config.yaml").read_text()
    figures = summary.get("figures", [])
    assert bool(figures) == (task not in TASKS_WITHOUT_FIGURES), figures
    pngs = {f.removesuffix(".png") for f in figures if f.endswith(".png")}
    assert {f.removesuffix(".pdf") for f in figures if f.endswith(".pdf")} == pngs and len(figures) == 2 * len(pngs)
    for fig in figures:
        assert (out / fig).stat().st_size > 1000
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".tmp-*"))
    with np.load(out / "arrays.npz") as arrays:
        for key in ARRAYS.get(experiment, ("z0", "samples", "psi", "logp")):
            assert np.isfinite(arrays[key]).all(), key
    assert ("weights" in summary) == (task in TASKS_WITH_WEIGHTS)
    if task in TASKS_WITH_WEIGHTS:  # the forcing's weights nu_t / rho_t, counted: none was NaN or infinite
        counts = summary["weights"]
        assert counts["evaluated"] > 0 and counts["nonfinite"] == 0, counts



def test_first_order_restart_reuses_finished_stages(tmp_path):
    out = tmp_path / "run"
    args = ["run", "experiment=gmm_first_order", f"hydra.run.dir={out}", "solver.progress=false",
            *TINY["gmm_first_order"]]
    assert diffsens(*args, cwd=tmp_path).returncode == 0
    stages = sorted(tmp_path.glob("outputs/stages/curve/*/arrays.npz"))
    assert len(stages) == 3  # ode, sde, hutchinson (the exact-density curve shares the ode stage)
    mtimes = [p.stat().st_mtime_ns for p in stages]
    (out / "summary.json").unlink()
    assert diffsens(*args, cwd=tmp_path).returncode == 0
    assert [p.stat().st_mtime_ns for p in stages] == mtimes
    assert (out / "summary.json").exists()


@pytest.mark.parametrize("args,expected", [
    (["solver.stepsize=0.1"], "solver.stepsize: no such key; solver has: method, integrator, step_size"),
    (["experiment=nope"], "experiment=nope: no such experiment; choose from: bench_engine, bench_influence, "
                          "bench_influence_faces, bench_paper_scale, bench_train, celeba_attributes, "
                          "celeba_attributes_paper, celeba_influence, "
                          "celeba_oldman, cifar10_crossclass, counterfactual_closed_form, "
                          "digits_counterfactual, digits_crossclass, digits_influence, digits_psi_convergence, "
                          "digits_typography, fisher_ot_check, "),
    (["solver.step_size=-0.001"], "solver.step_size: must be > 0, got -0.001"),
    (["solver.step_size=1e-30"], "solver.step_size: must be >= 1e-06 (at most 1,000,000 steps), got 1e-30"),
    (["solver.num_steps=10000000"], "solver.num_steps: must be in 1 .. 1000000, got 10000000"),
    (["seed=100000000000000000000000"], "seed: must be in 0 .. 4294967295, got 100000000000000000000000"),
    (["seed=-1"], "seed: must be in 0 .. 4294967295, got -1"),
    (["name=../x"], "name: must be a folder name of 1 to 100 characters without '/' (not '.' or '..'), got '../x'"),
    (["name=" + "n" * 300], "name: must be a folder name of 1 to 100 characters without '/' (not '.' or '..'), "
                            "got '" + "n" * 40 + "...'"),
    (["name=.."], "name: must be a folder name of 1 to 100 characters"),
    (["experiment=gmm_first_order", "perturbation.mean=[1,2,3]"],
     "perturbation.mean[0]: needs a scalar or 100 values (the dataset's dim)"),
    (["solver.method=sde", "solver.integrator=euler", "solver.density=ccov"],
     "solver.density: CCoV log-densities hold along ODE paths only"),
    (["stages.force=[train_bass]"], "stages.force: 'train_bass' is not one of train_base, train_retrain"),
    (["predict.modes=[retrain,finetuning]"], "predict.modes: 'finetuning' is not one of retrain, finetune"),
    (["ot.metric=cosine"], "ot.metric: 'cosine' is not one of euclidean, sqeuclidean"),
    (["solver.method=euler"], "solver.method: 'euler' is not one of ode, sde"),
])
def test_bad_input_is_one_clear_line(args, expected, cli_error):
    assert cli_error(["run", *args]).startswith(expected)


def test_a_stage_cache_that_is_a_file_is_one_line(tmp_path, cli_error):
    (tmp_path / "cache").write_text("x")
    assert cli_error(["run", "experiment=toy2d", f"stages.dir={tmp_path / 'cache'}"]) == \
        f"stages.dir: {tmp_path / 'cache'} exists and is not a folder"


def test_bad_input_in_a_real_process_is_one_line_on_stderr_and_exit_2(tmp_path):
    """What a shell sees (the in-process tests above check the same messages)."""
    r = diffsens_process("run", "solver.step_size=-0.001", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["diffsens: error: solver.step_size: must be > 0, got -0.001"]
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_and_help(tmp_path):
    r = diffsens("run", "experiment=toy2d", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0 and "task: toy2d" in r.stdout
    r = diffsens("run", "--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "experiment: bench_engine, bench_influence, bench_influence_faces, bench_paper_scale, bench_train, " \
           "celeba_attributes," in r.stdout
    assert diffsens("--help", cwd=tmp_path).returncode == 0


@pytest.mark.packaging
def test_configs_ship_in_a_non_editable_install(tmp_path):
    """Build the wheel, install it into a plain folder, and compose from there."""
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(wheel_dir.glob("diffsens-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for exp in EXPERIMENTS:
        assert f"diffsens_cli/configs/experiment/{exp}.yaml" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import diffsens_cli, sys; from pathlib import Path; "
            f"assert Path(diffsens_cli.__file__).is_relative_to({str(target)!r}), diffsens_cli.__file__; "
            "from diffsens_cli.cli import main; sys.argv=['diffsens','run','experiment=toy2d','--cfg','job']; main()")
    # -S: skip site's .pth files (the editable install's finder); other packages via PYTHONPATH.
    path = [str(target), *os.environ.get("PYTHONPATH", "").split(os.pathsep),
            *(p for p in sys.path if p.endswith("site-packages"))]
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}, timeout=600)
    assert r.returncode == 0 and "task: toy2d" in r.stdout, r.stderr[-2000:]


def test_synthetic_problem_is_configurable_from_overrides():
    """dataset.means/weights/std and perturbation.mean/std as a user types them."""
    overrides = ["experiment=gmm_first_order", "dataset.dim=3", "dataset.means=[-2,0,[1,2,3]]",
                 "dataset.weights=[1,1,2]", "dataset.std=[0.1,0.2,0.3]",
                 "perturbation.mean=0.5", "perturbation.std=0.25", "perturbation.direction=remove"]
    with initialize_config_module("diffsens_cli.configs", version_base="1.3"):
        comp = Components(compose("config", overrides=overrides))
    rho, nu = comp.target, comp.perturbation.measures[0]
    np.testing.assert_allclose(rho.means.numpy(), [[-2, -2, -2], [0, 0, 0], [1, 2, 3]])
    np.testing.assert_allclose(rho.log_weights.exp().numpy(), [0.25, 0.25, 0.5])
    np.testing.assert_allclose(rho.stds.numpy(), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(nu.means.numpy(), [[0.5, 0.5, 0.5]])
    np.testing.assert_allclose(nu.stds.numpy(), [0.25])
    assert comp.perturbation.signs == [-1.0]


def test_train_modes_and_resume(tmp_path):
    """Base, then retraining on the mixture with S, then fine-tuning the saved base model
    (at a vanishing learning rate it must come back as the base model's weights); a
    second run into the same directory with more steps continues from the checkpoint."""
    from diffsens_cli.models.pretrained import load_pretrained

    common = ["solver.progress=false", *TINY["train"]]
    base = tmp_path / "base"
    r = diffsens("train", f"hydra.run.dir={base}", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    first = np.load(base / "arrays.npz")["train_loss"]
    r = diffsens("train", f"hydra.run.dir={base}", *common, "train.steps=5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((base / "summary.json").read_text())
    losses = np.load(base / "arrays.npz")["train_loss"]
    assert resumed["metrics"]["steps"] == 5 and len(losses) == 5 and np.array_equal(losses[:3], first)

    retrain = tmp_path / "retrain"
    r = diffsens("train", f"hydra.run.dir={retrain}", *common, "train.mode=retrain",
                 "perturbation.source.num_images=30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((retrain / "summary.json").read_text())["sizes"] == {"rho": 64, "S": 30}

    tuned = tmp_path / "tuned"
    r = diffsens("train", f"hydra.run.dir={tuned}", *common, "train.mode=finetune", "model=pretrained",
                 f"model.path={base / 'model'}", "perturbation.source.num_images=30", "train.lr=1e-30",
                 "train.ema_decay=null", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after = load_pretrained(base / "model"), load_pretrained(tuned / "model")
    for a, b in zip(before.net.parameters(), after.net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("args,expected", [
    (["train.mode=finetune"], "model.kind: fine-tuning starts from a trained model: model=pretrained"),
    (["model=pretrained", "model.path=/no/such/model"], "model.path: /no/such/model"),
    (["dataset=mnist", "dataset.root=/no/such/mnist"], "dataset.root: /no/such/mnist"),
    (["model=unet_mnist", "dataset.image_size=10"],
     "model.block_out_channels: 3 levels need dataset.image_size divisible by 2^2 = 4; got 10x10"),
    (["train.mode=retrain", "perturbation.classes=[11]"], "perturbation.classes:"),
    (["train.eta_bar=1.5"], "train.eta_bar: must be in (0, 1), got 1.5"),
])
def test_bad_training_input_is_one_clear_line(args, expected, tmp_path, cli_error):
    # perturbation.classes is checked against the labels of the loaded data
    line = cli_error(["train", "solver.progress=false", *TINY["train"], *args], after_run_dir=True)
    assert line.startswith(expected)
    assert not list(tmp_path.rglob("step-*")) and not list(tmp_path.rglob("model"))


@pytest.mark.parametrize("args,expected", [
    (["experiment=toy2d", "solver.stepsize=1e-3,2e-3", "-m"],
     "solver.stepsize: no such key; solver has: method, integrator, step_size"),
    (["-m", "experiment=toy2d", "solver.step_size=1e-3,-2e-3"],
     "solver.step_size: must be > 0, got -0.002 (sweep job #1 of 2: solver.step_size=-0.002; no job was launched)"),
    (["--multirun", "experiment=toy2d,nope"], "experiment=nope: no such experiment"),
    (["-m", "experiment=glob(toy*)", "solver.step_size=-1"],
     "solver.step_size: must be > 0, got -1 (sweep job #0 of 1: experiment=toy2d; no job was launched)"),
    (["experiment=toy2d", "solver.step_size=1e-3,2e-3"],
     "solver.step_size=1e-3,2e-3: several values sweep solver.step_size, which needs -m"),
])
def test_every_job_of_a_sweep_is_checked_before_any_is_launched(args, expected, tmp_path, cli_error):
    assert cli_error(["run", *args]).startswith(expected)
    assert list(tmp_path.iterdir()) == []  # no multirun/, no outputs/


def test_a_checked_sweep_runs_every_job(tmp_path):
    """-m after the overrides, as users type it: both jobs run into multirun/."""
    r = diffsens("run", "experiment=toy2d", "solver.step_size=0.05,0.1", "size=tiny", "solver.progress=false",
                 "hydra.sweep.dir=sweep", "-m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from omegaconf import OmegaConf

    assert all((tmp_path / "sweep" / str(i) / "summary.json").is_file() for i in (0, 1))
    assert [OmegaConf.load(tmp_path / "sweep" / str(i) / "config.yaml").solver.step_size for i in (0, 1)] == [0.05, 0.1]
