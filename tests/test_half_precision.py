"""Half-precision network evaluations (``solver.network_dtype``): the network's copy cast in
and out, forward-mode AD through it, the checked config, the stage keys of runs without
it, and the check that offers or refuses it by psi's distance from the run's dtype."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import TINY
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffsens_cli.builders import Components, network_precision
from diffsens_cli.core.schedule import VPDiscrete
from diffsens_cli.errors import ConfigError
from diffsens_cli.models.network import HalfPrecisionNet
from diffsens_cli.models.pretrained import save_pretrained
from diffsens_cli.models.unet import build_network_model
from diffsens_cli.pipelines.shared.image_stages import ImageStages, solver_depends
from diffsens_cli.stages import StageCache, stage_key

UNET = {"kind": "unet", "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": 4, "seed": 0}


def _compose(*overrides: str):
    with initialize_config_module("diffsens_cli.configs", version_base=None):
        return compose("config", overrides=["solver.device=cpu", *overrides])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_a_half_precision_network_is_its_copy_cast_in_and_out_under_forward_and_reverse_ad():
    """The score, its JVP (the forward tangents) and its VJP (the influence adjoint) equal
    those of ``net.to(dtype)`` with the input and vectors cast in and the output cast back
    (torch.autocast fails here: it casts the weights, not forward-mode tangents); the
    original network stays float32; bfloat16 (8 bits of mantissa) lands further from
    float32 than float16 (11 bits)."""
    model = build_network_model(UNET, (1, 8, 8), VPDiscrete())
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(2, 3, 1, 8, 8, generator=gen)
    t = torch.tensor(0.4)
    with torch.no_grad():
        s, jv = model.score_and_jvp(z, t, v)
    _, vj = model.score_and_vjp(z, t, v)
    errors = {}
    for dtype in (torch.float16, torch.bfloat16):
        half = model.evaluated_in(dtype)
        with torch.no_grad():
            hs, hjv = half.score_and_jvp(z, t, v)
        _, hvj = half.score_and_vjp(z, t, v)
        assert hs.dtype == hjv.dtype == hvj.dtype == torch.float32
        cast = copy.deepcopy(model.net).to(dtype)
        timestep = model.schedule.model_time(t).expand(3)
        by_hand = lambda x: model.prediction.to_score(cast(x.to(dtype), timestep).to(x.dtype), x,
                                                      model.schedule.alpha(t), model.schedule.sigma(t))
        # to 1e-6 of half precision's own error (about 1e-3): the same computation. The
        # reverse pass unbatched: vmapped, float16's convolution backward on the CPU sums
        # in another order and lands 1.4e-3 away (bfloat16's does not).
        for k in range(2):
            with torch.no_grad():
                ref_s, ref_jv = torch.func.jvp(by_hand, (z,), (v[k],))
            got_vj, ref_vj = (torch.func.vjp(f, z)[1](v[k])[0] for f in (lambda x: half.score(x, t), by_hand))
            for got, ref in ((hs, ref_s), (hjv[k], ref_jv), (got_vj, ref_vj)):
                assert _relative(got, ref) < 1e-6
        errors[dtype] = (_relative(hs, s), _relative(hjv, jv), _relative(hvj, vj))
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    for i in range(3):
        assert 0 < errors[torch.float16][i] < errors[torch.bfloat16][i] < 0.05, errors


@pytest.mark.parametrize("key,value", [("solver.network_dtype", "float8"),
                                       ("solver.network_dtype_check.tolerance", "0"),
                                       ("solver.network_dtype_check.samples", "0")])
def test_a_bad_network_dtype_setting_names_its_key(key, value):
    cfg = _compose("solver.network_dtype=float16", f"{key}={value}")
    with pytest.raises(ConfigError) as e:
        network_precision(cfg.solver)
    assert e.value.key == key


def test_network_dtype_null_is_none_and_synthetic_experiments_refuse_half_precision():
    assert network_precision(_compose().solver) is None
    precision = network_precision(_compose("solver.network_dtype=bfloat16").solver)
    assert (precision.dtype, precision.check_samples, precision.tolerance) == (torch.bfloat16, 4, 0.01)
    with pytest.raises(ConfigError) as e:
        Components(_compose("experiment=gmm_first_order", "solver.network_dtype=float16"))
    assert e.value.key == "solver.network_dtype"


def test_runs_without_half_precision_keep_their_stage_keys():
    """With network_dtype null the solver's stage key is the one computed before the option
    existed (the main job's default solver on the CPU; the value from commit 25a5f91), so
    finished stages are reused; set, it changes the key, and its check settings do not."""
    assert stage_key(solver_depends(_compose().solver)) == "e7c3c3056887"
    half = solver_depends(_compose("solver.network_dtype=float16").solver)
    assert half["network_dtype"] == "float16" and "network_dtype_check" not in half
    looser = solver_depends(_compose("solver.network_dtype=float16", "solver.network_dtype_check.tolerance=0.5").solver)
    assert looser == half


@pytest.fixture
def digits_stages(tmp_path):
    """A tiny experiment's stages in ``tmp_path`` and a model with random weights of its
    architecture, saved (no training)."""

    def make(*overrides: str, scale_output: float = 1.0, experiment: str = "digits_typography"):
        cfg = _compose(f"experiment={experiment}", *TINY[experiment], "solver.progress=false", "solver.num_steps=8",
                       *overrides)
        stages = ImageStages(cfg, StageCache(tmp_path / "stages"))
        model = build_network_model(cfg.model, stages.event_shape, VPDiscrete(), forward_ad=False)
        with torch.no_grad():
            model.net.model.conv_out.weight.mul_(scale_output)
        save_pretrained(model, tmp_path / "model")
        return stages, ("test/model", tmp_path / "model")

    return make


def test_the_check_offers_a_close_dtype_and_refuses_a_far_one_with_the_measured_distance(digits_stages, capsys):
    stages, model = digits_stages("solver.network_dtype=float16", "solver.network_dtype_check.tolerance=0.05")
    half = stages.integration_model(model)
    assert isinstance(half.net, HalfPrecisionNet) and half.net.dtype == torch.float16
    assert "solver.network_dtype=float16 checked" in capsys.readouterr().err
    assert stages.integration_model(model) is half  # checked once per process
    assert capsys.readouterr().err == ""
    stages, model = digits_stages("solver.network_dtype=bfloat16", "solver.network_dtype_check.tolerance=1e-9")
    with pytest.raises(ConfigError, match=r"bfloat16 is [0-9.]+% \(median; largest [0-9.]+%\) .* above solver\."
                                          r"network_dtype_check\.tolerance=1e-09") as e:
        stages.integration_model(model)
    assert e.value.key == "solver.network_dtype"
    found = {}
    for path in (p for p in (stages.cache.root / "network_dtype_check").iterdir() if p.is_dir()):
        done = OmegaConf.create((path / "done.json").read_text())
        with np.load(path / "arrays.npz") as arrays:
            found[done.depends.solver.network_dtype] = arrays["psi_distance"]
    assert set(found) == {"float16", "bfloat16"} and all(len(d) == 4 for d in found.values())
    assert 0 < np.median(found["float16"]) < np.median(found["bfloat16"]) < 0.05


def test_the_check_refuses_a_dtype_whose_range_the_network_overflows(digits_stages):
    """Outputs of about 1e6 overflow float16 (largest 65504) but not bfloat16."""
    stages, model = digits_stages("solver.network_dtype=float16", scale_output=1e6)
    with pytest.raises(ConfigError, match="not finite with the network in float16; use null or bfloat16"):
        stages.integration_model(model)


def test_a_cached_stage_is_not_reused_past_a_check_that_fails_now(digits_stages, tmp_path):
    """The check runs before a stage that integrates in half precision is read: a
    sensitivity stage computed with a forced tolerance is refused at a smaller one."""
    stages, model = digits_stages("solver.network_dtype=bfloat16", "solver.network_dtype_check.tolerance=1")
    stages.sensitivity(model, 2)
    assert len(list((tmp_path / "stages" / "sensitivity").glob("*/done.json"))) == 1
    strict, model = digits_stages("solver.network_dtype=bfloat16", "solver.network_dtype_check.tolerance=1e-9")
    with pytest.raises(ConfigError, match="above solver.network_dtype_check.tolerance=1e-09"):
        strict.sensitivity(model, 2)


def test_influence_integrates_the_half_copy_and_attributes_with_the_full_model(digits_stages, tmp_path, monkeypatch):
    """An influence experiment (no S of its own) checks its model toward rho; its source
    integrates the half-precision copy while the training-side attributions (TRAK, the
    loss) keep the full-precision network."""
    from diffsens_cli.pipelines import influence
    from diffsens_cli.rundir import RunDir

    stages, model = digits_stages("solver.network_dtype=float16", "solver.network_dtype_check.tolerance=0.05",
                                  experiment="digits_influence")
    monkeypatch.setattr(ImageStages, "base", lambda self: model)
    source = influence.image_source(stages.cfg, RunDir(tmp_path / "run", stages.cache))
    assert isinstance(source.integrated.net, HalfPrecisionNet) and not isinstance(source.model.net, HalfPrecisionNet)
    assert (tmp_path / "stages" / "network_dtype_check").is_dir()


def test_only_tasks_that_integrate_image_networks_take_a_network_dtype(cli_error):
    assert cli_error(["run", "experiment=toy2d", "solver.network_dtype=float16"]).startswith(
        "solver.network_dtype: half-precision network evaluations are for the tasks that integrate image networks")
    assert cli_error(["run", "experiment=digits_typography", "size=tiny", "solver.network_dtype=half"]).startswith(
        "solver.network_dtype: 'half' is not one of null, float16, bfloat16")

