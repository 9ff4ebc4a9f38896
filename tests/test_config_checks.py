"""Every config value is checked before any work: a value of the wrong type or range, a bad
perturbation file, a missing data folder or model directory ends in one line naming the key,
exit status 2, and no run directory. Also: CIFAR-10 batches re-saved by Python 3 load."""

from __future__ import annotations

import codecs
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers import UNet2DModel
from safetensors.torch import save_file

from diffsens_cli.data import load_images
from diffsens_cli.data.synthetic import read_points
from diffsens_cli.errors import ConfigError, flag, listed, number, whole


def test_typed_accessors():
    with pytest.raises(ConfigError, match=r"^solver.step_size: must be a number, got 'abc'$"):
        number("abc", "solver.step_size")
    with pytest.raises(ConfigError, match=r"^x: must be a number, got True$"):
        number(True, "x")
    with pytest.raises(ConfigError, match=r"^x: must be finite, got nan$"):
        number(float("nan"), "x")
    with pytest.raises(ConfigError, match=r"^solver.num_steps: must be a whole number, got 2.5$"):
        whole(2.5, "solver.num_steps")
    with pytest.raises(ConfigError, match=r"^x: must be true or false, got 'yes'$"):
        flag("yes", "x")
    with pytest.raises(ConfigError, match=r"^x\[1\]: must be a number, got 'b'$"):
        listed([1, "b"], "x", number)
    assert (number(2, "x"), whole(1e3, "x"), whole(None, "x", null=True), flag(False, "x")) == (2.0, 1000, None, False)


@pytest.mark.parametrize("args,expected", [
    (["experiment=toy2d", "solver.step_size=abc"], "solver.step_size: must be null or a number, got 'abc'"),
    (["experiment=toy2d", "solver.num_steps=2.5"], "solver.num_steps: must be null or a whole number, got 2.5"),
    (["experiment=toy2d", "solver.weight_clamp=[a,b]"], "solver.weight_clamp[0]: must be a number, got 'a'"),
    (["experiment=toy2d", "solver.progress=yes"], "solver.progress: must be true or false, got 'yes'"),
    (["experiment=toy2d", "seed=abc"], "seed: must be a whole number, got 'abc'"),
    (["experiment=toy2d", "toy2d.grid_size=abc"], "toy2d.grid_size: must be a whole number >= 2, got 'abc'"),
    (["experiment=toy2d", "dataset.num_points=2.5"], "dataset.num_points: must be a whole number >= 2, got 2.5"),
    (["experiment=toy2d", "schedule.beta_end=abc"], "schedule.beta_end: must be a number, got 'abc'"),
    (["experiment=gmm_first_order", "dataset.dim=abc"], "dataset.dim: must be a whole number >= 1, got 'abc'"),
    (["experiment=gmm_first_order", "perturbation.std=abc"], "perturbation.std: must be a number, got 'abc'"),
    (["experiment=gmm_first_order", "first_order.ode_step_sizes=[0]"],
     "first_order.ode_step_sizes[0]: must be in (0, 0.999] (1 - solver.t_min), got 0"),
    (["experiment=gmm_first_order", "first_order.sde_step_sizes=[-0.05]"],
     "first_order.sde_step_sizes[0]: must be in (0, 0.999] (1 - solver.t_min), got -0.05"),
    (["experiment=gmm_first_order", "first_order.hutchinson_samples=[1,0]"],
     "first_order.hutchinson_samples[1]: must be a whole number >= 1, got 0"),
    (["experiment=gmm_first_order", "first_order.hutchinson_probes=[gauss]"],
     "first_order.hutchinson_probes[0]: 'gauss' is not one of gaussian, rademacher"),
    (["experiment=gmm_first_order", "first_order.etas=[0.1,x]"], "first_order.etas[1]: must be a number, got 'x'"),
    (["experiment=gmm_first_order", "perturbation.mean=1e300"],  # its square overflows float64: all NaN psi
     "perturbation: its means' squared norms overflow solver.dtype=float64 (largest 1.8e+308): its values reach "
     "1e+300"),
    (["experiment=gmm_first_order", "perturbation.mean=1e39", "solver.dtype=float32"],
     "perturbation: its means overflow solver.dtype=float32 (largest 3.4e+38): its values reach 1e+39"),
    (["experiment=gmm_first_order", "dataset.means=[-1e200,1e200]"],
     "dataset: its means' squared norms overflow solver.dtype=float64"),
    (["experiment=gmm_first_order", "first_order.num_samples=1.5"],
     "first_order.num_samples: must be a whole number >= 1, got 1.5"),
    (["experiment=gmm_score_error", "train.lr=abc"], "train.lr: must be a number, got 'abc'"),
    (["experiment=gmm_score_error", "train.hflip=yes"], "train.hflip: must be true or false, got 'yes'"),
    (["experiment=gmm_score_error", "model.hidden=abc"], "model.hidden: must be a whole number >= 1, got 'abc'"),
    (["experiment=gmm_score_error", "score_error.eval_every=x"],
     "score_error.eval_every: must be a whole number >= 1, got 'x'"),
    (["experiment=bench_engine", "bench.repeats=1.5"], "bench.repeats: must be a whole number >= 1, got 1.5"),
    (["experiment=digits_typography", "predict.num_samples=abc"],
     "predict.num_samples: must be a whole number >= 2, got 'abc'"),
    (["experiment=digits_typography", "ot.reg=abc"], "ot.reg: must be a number, got 'abc'"),
    (["experiment=digits_typography", "dataset.limit=0"], "dataset.limit: must be null or a whole number >= 1, got 0"),
    (["experiment=digits_typography", "dataset.image_size=abc"],
     "dataset.image_size: must be null or a whole number >= 1, got 'abc'"),
    (["experiment=digits_typography", "model.layers_per_block=x"],
     "model.layers_per_block: must be a whole number >= 1, got 'x'"),
    (["experiment=digits_typography", "perturbation.source.num_images=0"],
     "perturbation.source.num_images: must be a whole number >= 1, got 0"),
    (["experiment=digits_typography", "dataset=mnist", "dataset.root=/nope"], "dataset.root: /nope is not a folder"),
    (["experiment=digits_typography", "model=pretrained", "model.path=/nope"], "model.path: /nope is not a directory"),
    (["experiment=celeba_attributes", "attributes.coefficients=[a]"],
     "attributes.coefficients[0]: must be a number, got 'a'"),
    (["experiment=celeba_oldman", "dataset.root=/nope"], "dataset.root: /nope is not a folder"),
])
def test_bad_values_stop_before_the_run_directory(args, expected, tmp_path, cli_error):
    assert cli_error(["run", *args]).startswith(expected)


@pytest.mark.parametrize("args,expected", [
    (["sample.num_steps=abc"], "sample.num_steps: must be a whole number >= 1, got 'abc'"),
    (["dataset=mnist", "dataset.root=/nope"], "dataset.root: /nope is not a folder"),
    (["dataset.limit=-1"], "dataset.limit: must be null or a whole number >= 1, got -1"),
    (["train.mode=finetune", "model=pretrained", "model.path=/nope"], "model.path: /nope is not a directory"),
    (["train.mode=retrain", "perturbation.source.glyph_size=2"], "perturbation.source.glyph_size: must be in (0, 1]"),
])
def test_bad_training_values_stop_before_the_run_directory(args, expected, tmp_path, cli_error):
    assert cli_error(["train", *args]).startswith(expected)


def test_data_folders_with_the_wrong_files_stop_before_the_run_directory(tmp_path, cli_error):
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    (mnist / "train-images-idx3-ubyte").write_bytes(b"garbage")
    base = ["run", "experiment=digits_typography", "dataset=mnist", f"dataset.root={mnist}"]
    assert cli_error(base) == (
        f"dataset.root: {mnist / 'train-images-idx3-ubyte'} is not an IDX file of unsigned bytes "
        "(magic 0x0000080N, N sizes of at least 1, then exactly their product in bytes)")
    celeba = tmp_path / "celeba"
    celeba.mkdir()
    assert cli_error(["run", "experiment=celeba_oldman", f"dataset.root={celeba}"]).startswith(
        f"dataset.root: {celeba} has no img_align_celeba; CelebA expects")


def test_a_model_directory_of_the_wrong_shape_stops_before_the_run_directory(tmp_path, cli_error):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "scheduler").mkdir()
    config = {"_class_name": "UNet2DModel", "sample_size": 28, "in_channels": 1, "out_channels": 1,
              "block_out_channels": [4, 8], "norm_num_groups": 4, "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    (model / "unet" / "config.json").write_text(json.dumps(config))
    save_file(UNet2DModel.from_config(config).state_dict(), model / "unet" / "diffusion_pytorch_model.safetensors")
    (model / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDPMScheduler"}')
    args = ["run", "experiment=digits_typography", "model=pretrained", f"model.path={model}"]
    assert cli_error(args) == (
        f"model.path: the model at {model} takes images of shape (1, 28, 28), but the dataset gives samples of "
        "shape (1, 8, 8) (see dataset.image_size)")


def test_the_installed_command_stops_in_one_line(tmp_path):
    """The same through a fresh process, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "diffsens_cli", "run", "experiment=gmm_first_order",
                        "first_order.ode_step_sizes=[0]"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=600)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "diffsens: error: first_order.ode_step_sizes[0]: must be in (0, 0.999] (1 - solver.t_min), got 0"]
    assert not (tmp_path / "outputs").exists()


# --- perturbation files ----------------------------------------------------------------------


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        np.save(path, content, allow_pickle=True)
    return path


@pytest.mark.parametrize("name,content,expected", [
    ("nan.npy", np.full((3, 2), np.nan), "holds non-finite values (NaN or inf); expected a .npy or .txt array [K, 2]"),
    ("inf.txt", "1 2\n3 inf\n", "holds non-finite values (NaN or inf)"),
    ("zero_d.npy", np.array(1.0), "holds an array of shape (); expected a .npy or .txt array [K, 2]"),
    ("empty.npy", np.zeros((0, 2)), "holds an array of shape (0, 2); expected"),
    ("cube.npy", np.zeros((2, 2, 2)), "holds an array of shape (2, 2, 2); expected"),
    ("text.npy", np.array([["a", "b"]]), "holds <U1 values; expected"),
    ("wide.npy", np.zeros((3, 5)), "holds points of dimension 5, but the dataset has dim 2"),
])
def test_perturbation_files_are_checked(name, content, expected, tmp_path):
    path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError) as e:
        read_points(str(path), 2)
    assert str(e.value).startswith(f"perturbation.path: {path} {expected}") and "\n" not in str(e.value)


@pytest.mark.parametrize("name,content", [
    ("object.npy", np.array([{"a": 1}], dtype=object)),  # a pickle inside: refused, never loaded
    ("garbage.npy", b"not a numpy file"),
    ("garbage.txt", "a b\n1 2\n"),
])
def test_unreadable_perturbation_files_are_one_line(name, content, tmp_path):
    path = _write(tmp_path / name, content)
    with pytest.raises(ConfigError) as e:
        read_points(str(path), 2)
    message = str(e.value)
    assert message.startswith(f"perturbation.path: cannot read {path}: ") and "\n" not in message
    assert message.endswith("; expected a .npy or .txt array [K, 2] of finite numbers")


def test_good_perturbation_files_load(tmp_path):
    points = np.arange(6.0).reshape(3, 2)
    assert np.array_equal(read_points(str(_write(tmp_path / "p.npy", points)), 2), points)
    assert np.array_equal(read_points(str(_write(tmp_path / "p.txt", "0 1\n2 3\n4 5\n")), 2), points)


def test_a_nan_perturbation_file_stops_the_cli(tmp_path, cli_error):
    path = _write(tmp_path / "nan.npy", np.full((3, 2), np.nan))
    args = ["run", "experiment=toy2d", "perturbation=empirical", f"perturbation.path={path}"]
    assert cli_error(args) == (
        f"perturbation.path: {path} holds non-finite values (NaN or inf); expected a .npy or .txt array [K, 2] of "
        "finite numbers")


# --- CIFAR-10 batches re-saved by Python 3 ---------------------------------------------------


def _cifar(root: Path, batch: dict, protocol: int = 2) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=protocol)
    return {"kind": "cifar10", "root": str(root), "split": "test", "image_size": None, "limit": None, "seed": 0}


def test_cifar_batch_resaved_by_python3_at_protocol_2_loads(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, (3, 3072), dtype=np.uint8)
    cfg = _cifar(tmp_path, {b"batch_label": b"testing batch 1 of 1", b"labels": [3, 1, 4], b"data": data,
                            b"filenames": [b"a.png", b"b.png", b"c.png"]})
    assert b"c_codecs\nencode\n" in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    images = load_images(cfg)
    assert images.labels.tolist() == [3, 1, 4]
    assert np.array_equal(((images.images + 1) * 127.5).round().numpy().astype(np.uint8).reshape(3, 3072), data)


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("keys", ["bytes", "str"])
def test_cifar_batch_resaved_at_newer_protocols_or_with_str_keys_loads(tmp_path, protocol, keys):
    """Protocol 5 pickles arrays through numpy's _frombuffer; a batch loaded with
    encoding='latin1' and saved again has str keys."""
    data = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
    key = (lambda k: k.encode()) if keys == "bytes" else (lambda k: k)
    cfg = _cifar(tmp_path, {key("labels"): [7, 2], key("data"): data}, protocol=protocol)
    images = load_images(cfg)
    assert images.labels.tolist() == [7, 2]
    assert np.array_equal(((images.images + 1) * 127.5).round().numpy().astype(np.uint8).reshape(2, 3072), data)


class _Rot13:
    def __reduce__(self):
        return codecs.encode, ("uryyb", "rot13")


def test_cifar_codecs_encode_admits_latin1_text_only(tmp_path):
    cfg = _cifar(tmp_path, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Rot13()})
    with pytest.raises(ConfigError) as e:
        load_images(cfg)
    assert str(e.value) == (f"dataset.root: {tmp_path / 'cifar-10-batches-py' / 'test_batch'} is not a CIFAR-10 "
                            "batch: it asks for _codecs.encode of str with 'rot13', which is refused (only latin-1 "
                            "text to bytes)")


def test_counts_are_read_by_one_reader_with_one_wording():
    """A data set's ``limit`` and a solver's count take the same values (1e3 is 1000
    everywhere) and are refused in the same words."""
    from diffsens_cli.data.base import Spec

    spec = Spec({"limit": 1e3, "image_size": 0}, "dataset")
    assert spec.positive_int("limit") == 1000
    with pytest.raises(ConfigError, match=r"^dataset.image_size: must be null or a whole number >= 1, got 0$"):
        spec.positive_int("image_size")
    with pytest.raises(ConfigError, match=r"^solver.num_steps: must be null or a whole number >= 1, got 0$"):
        whole(0, "solver.num_steps", null=True, at_least=1)
