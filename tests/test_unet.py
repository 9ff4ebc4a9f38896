"""Neural score models: prediction types against exact scores, UNet forward-mode JVPs
against finite differences, save/load round trips, scheduler configs against diffusers,
and the one-line errors."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.func import jvp

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VE, VPDiscrete, VPLinear
from diffsens_cli.errors import ConfigError, DiffsensError
from diffsens_cli.models.network import (
    ContiguousGroupNorm,
    FourierMLP,
    MatmulAttnProcessor,
    NetworkScore,
    Prediction,
    UNetAdapter,
    disable_forward_ad,
    enable_forward_ad,
)
from diffsens_cli.models.pretrained import (
    BETA_SCHEDULES,
    LAYOUT,
    load_pretrained,
    save_pretrained,
    schedule_from_scheduler_config,
)
from diffsens_cli.models.unet import build_network_model, build_unet

CONFIGS = Path(__file__).resolve().parents[1] / "configs/model"  # from any working directory
TINY_UNET = {"kind": "unet", "prediction": "epsilon", "block_out_channels": [8, 16], "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "norm_num_groups": 4, "attention_head_dim": 4, "seed": 0}
SHAPE = (2, 8, 8)
T = torch.tensor(0.61237, dtype=torch.float64)  # model time 386.63: between the UNet's integer timesteps


pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks are many small ops: a second thread only adds barrier waits, and
    made the UNet tests 40x slower while another process used the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ExactNetwork(nn.Module):
    """The exact score of ``exact`` dressed up as a network of one prediction type:
    eps = -sigma s, x0 = (z + sigma^2 s) / alpha, v = alpha eps - sigma x0."""

    def __init__(self, exact: MixtureScore, kind: str):
        super().__init__()
        self.exact, self.kind = exact, kind

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sched = self.exact.schedule
        t = 1 - (timestep[0] + 1) / sched.num_train_timesteps  # inverse of Schedule.model_time
        alpha, sigma, s = sched.alpha(t), sched.sigma(t), self.exact.score(z, t)
        eps, x0 = -sigma * s, (z + sigma**2 * s) / alpha
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0, "score": s}[self.kind]


def mixture(d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(k, d, generator=g), torch.rand(k, generator=g) * 0.5 + 0.1,
                           torch.rand(k, generator=g) + 0.1)


def tiny_unet_model(prediction="epsilon", scheduler=None) -> NetworkScore:
    sched = schedule_from_scheduler_config(scheduler or {"beta_schedule": "linear"})
    return build_network_model({**TINY_UNET, "prediction": prediction}, SHAPE, sched, dtype=torch.float64)


# -- 1. prediction types ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "score"])
def test_prediction_to_score_recovers_the_exact_score_and_its_jvp(kind):
    """A network of each type that outputs the exact eps / x0 / v / score gives back the
    exact score, and (through the generic vmapped JVP) the exact J_z s."""
    exact = MixtureScore(mixture(), VPDiscrete())
    model = NetworkScore(ExactNetwork(exact, kind), exact.schedule, kind)
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(6, 5, generator=g), torch.randn(3, 6, 5, generator=g)
    s_ref, j_ref = exact.score_and_jvp(z, T, v)
    s, j = model.score_and_jvp(z, T, v)
    torch.testing.assert_close(s, s_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(j, j_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("schedule", [VPDiscrete(), VE()], ids=["vp", "ve"])
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction", "score"])
def test_prediction_target_is_the_exact_network_output_for_a_point_mass(kind, schedule):
    """For rho = delta_{x0} the posterior is exact, so the optimal network's output at
    z = alpha x0 + sigma eps is exactly the regression target: eps, x0 or
    alpha eps - sigma x0 (v also inverts exactly off VP)."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 5, generator=g), torch.randn(4, 5, generator=g)
    exact = MixtureScore(GaussianMixture.empirical(x0), schedule)
    alpha, sigma = schedule.alpha(T), schedule.sigma(T)
    z = alpha * x0 + sigma * eps
    target = Prediction(kind).target(x0.expand_as(eps), eps, alpha, sigma)
    torch.testing.assert_close(ExactNetwork(exact, kind)(z, schedule.model_time(T).expand(4)), target,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Prediction(kind).to_score(target, z, alpha, sigma), -eps / sigma,
                               rtol=1e-12, atol=1e-12)
    expected = {"epsilon": eps, "sample": x0.expand_as(eps), "v_prediction": alpha * eps - sigma * x0,
                "score": -eps / sigma}[kind]
    torch.testing.assert_close(target, expected, rtol=0, atol=0)


def test_prediction_rejects_unknown_types():
    with pytest.raises(ConfigError, match=r"^model.prediction: 'noise' is not one of epsilon, sample, "
                                          r"v_prediction, score$"):
        NetworkScore(nn.Identity(), VPLinear(), "noise")


# -- 3. forward-mode AD through the UNet with attention ---------------------------------

def test_forward_ad_fixes_keep_the_outputs_and_are_idempotent():
    """Plain-matmul attention and contiguous GroupNorm give the fused kernels' output
    (float64, 1e-12); installing twice changes nothing; disabling restores the defaults."""
    net = UNetAdapter(build_unet(TINY_UNET, SHAPE))
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(3))
    n = VPDiscrete().model_time(T).expand(3)
    ref = net(z, n)
    keys = list(net.state_dict())
    enable_forward_ad(enable_forward_ad(net))
    processors = [m.processor for m in net.modules() if hasattr(m, "processor")]
    assert len(processors) == 4 and all(isinstance(p, MatmulAttnProcessor) for p in processors)  # down 1, mid 1, up 2
    assert all(type(m) is ContiguousGroupNorm for m in net.modules() if isinstance(m, nn.GroupNorm))
    torch.testing.assert_close(net(z, n), ref, rtol=1e-12, atol=1e-12)
    assert list(net.state_dict()) == keys
    disable_forward_ad(net)
    assert not any(isinstance(m, ContiguousGroupNorm) for m in net.modules())
    assert not any(isinstance(m.processor, MatmulAttnProcessor) for m in net.modules() if hasattr(m, "processor"))
    torch.testing.assert_close(net(z, n), ref, rtol=1e-12, atol=1e-12)


def test_each_fix_is_needed_for_forward_ad():
    """As shipped (torch 2.13), forward-mode AD through the UNet fails in the fused
    attention kernel; with plain-matmul attention alone it still fails in GroupNorm."""
    net = UNetAdapter(build_unet(TINY_UNET, SHAPE))
    z, n = torch.randn(1, *SHAPE), torch.full((1,), 386.63)
    with pytest.raises(NotImplementedError, match="Trying to use forward AD with _scaled_dot_product"):
        jvp(lambda x: net(x, n), (z,), (z,))
    for m in net.modules():
        if hasattr(m, "processor"):
            m.set_processor(MatmulAttnProcessor())
    with pytest.raises(RuntimeError, match="view size is not compatible with input tensor's size and stride"):
        jvp(lambda x: net(x, n), (z,), (z,))
    enable_forward_ad(net)
    jvp(lambda x: net(x, n), (z,), (z,))


def test_unet_score_jvp_matches_finite_difference():
    """NetworkScore.score_and_jvp (one jvp vmapped over 2 tangents) through a UNet with
    attention, at a fractional timestep, against a fourth-order central difference:
    measured error falls as h^4: 4e-10 relative at h = 1e-3, 4e-12 at h = 3e-4."""
    model = tiny_unet_model()
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(2, *SHAPE, generator=g), torch.randn(2, 2, *SHAPE, generator=g)
    s, j = model.score_and_jvp(z, T, v)
    h = 3e-4

    def fd(vi):
        f = lambda a: model.score(z + a * h * vi, T)  # noqa: E731
        return (-f(2) + 8 * f(1) - 8 * f(-1) + f(-2)) / (12 * h)

    ref = torch.stack([fd(vi) for vi in v])
    assert ref.abs().max() > 0.5  # a non-trivial Jacobian
    torch.testing.assert_close(j, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s, model.score(z, T), rtol=1e-13, atol=1e-13)


# -- 4. save / load ----------------------------------------------------------------------

def test_fourier_mlp_round_trip_keeps_frequencies_and_scores(tmp_path):
    """The MLP's frequencies are saved with the weights (here not the ones its seed
    would draw), and the reloaded model's scores are bit-identical."""
    net = FourierMLP(SHAPE[0] * 64, hidden=16, num_frequencies=8)
    with torch.no_grad():
        net.freqs.mul_(1.5)
    model = NetworkScore(net, schedule_from_scheduler_config({"beta_schedule": "scaled_linear"}), "sample")
    assert save_pretrained(model, tmp_path / "m") == tmp_path / "m"
    loaded = load_pretrained(tmp_path / "m", dtype=torch.float64)
    assert isinstance(loaded.net, FourierMLP) and loaded.prediction == Prediction("sample")
    assert torch.equal(loaded.net.freqs, net.freqs)
    z = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded.score(z, T), model.score(z, T))
    assert torch.equal(loaded.schedule.alpha(T), model.schedule.alpha(T))


@pytest.mark.parametrize("prediction,beta_schedule", [("epsilon", "linear"), ("v_prediction", "squaredcos_cap_v2")])
def test_unet_round_trip_gives_identical_weights_and_scores(tmp_path, prediction, beta_schedule):
    model = tiny_unet_model(prediction, {"beta_schedule": beta_schedule})
    save_pretrained(model, tmp_path / "m")
    save_pretrained(model, tmp_path / "m")  # replacing an existing model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary siblings left
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["scheduler", "unet"]
    loaded = load_pretrained(tmp_path / "m", dtype=torch.float64)
    assert loaded.prediction.kind == prediction
    assert all(isinstance(m.processor, MatmulAttnProcessor) for m in loaded.net.modules() if hasattr(m, "processor"))
    assert not loaded.net.training
    saved, back = model.net.state_dict(), loaded.net.state_dict()
    assert list(saved) == list(back) and all(torch.equal(saved[k], back[k]) for k in saved)
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(6))
    v = torch.randn(2, 2, *SHAPE, generator=torch.Generator().manual_seed(7))
    for a, b in zip(loaded.score_and_jvp(z, T, v), model.score_and_jvp(z, T, v)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # same weights; kernels may round differently
    with pytest.raises(ConfigError) as e:
        build_network_model({"kind": "pretrained", "path": str(tmp_path / "m")}, (2, 16, 16), VPLinear())
    assert str(e.value) == (f"model.path: the model at {tmp_path / 'm'} takes images of shape (2, 8, 8), but the "
                            f"dataset gives samples of shape (2, 16, 16) (see dataset.image_size)")


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_loaded_prediction_type_comes_from_the_scheduler_config(tmp_path, prediction):
    """Edit prediction_type in a saved scheduler config: the loaded score follows the
    closed forms s = (alpha x0_hat - z)/sigma^2 and s = -(sigma z + alpha v_hat)/sigma (VP)."""
    save_pretrained(tiny_unet_model(), tmp_path / "m")
    file = tmp_path / "m/scheduler/scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "prediction_type": prediction}))
    loaded = load_pretrained(tmp_path / "m", dtype=torch.float64)
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8))
    sched = loaded.schedule
    alpha, sigma = sched.alpha(T), sched.sigma(T)
    out = loaded.net(z, sched.model_time(T).expand(2))
    expected = (alpha * out - z) / sigma**2 if prediction == "sample" else -(sigma * z + alpha * out) / sigma
    torch.testing.assert_close(loaded.score(z, T), expected, rtol=1e-13, atol=1e-13)


def test_save_refuses_what_a_scheduler_config_cannot_describe(tmp_path):
    net = FourierMLP(5, hidden=8, num_frequencies=4)
    with pytest.raises(DiffsensError, match=r"^save_pretrained: a VPLinear schedule has no DDPMScheduler config"):
        save_pretrained(NetworkScore(net, VPLinear()), tmp_path / "m")
    with pytest.raises(DiffsensError, match=r"^save_pretrained: prediction 'score' has no DDPMScheduler"):
        save_pretrained(NetworkScore(net, VPDiscrete(), "score"), tmp_path / "m")
    assert not any(tmp_path.iterdir())


def test_load_errors_name_the_path_and_the_layout(tmp_path):
    root = tmp_path / "m"
    save_pretrained(NetworkScore(FourierMLP(5, hidden=8, num_frequencies=4), VPDiscrete()), root)

    def fails(message):
        with pytest.raises(ConfigError) as e:
            load_pretrained(root)
        assert str(e.value) == f"model.path: {message}"

    shutil.move(root / "unet/diffusion_pytorch_model.safetensors", tmp_path / "weights")
    fails(f"{root / 'unet'} has no weights (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin); "
          f"{LAYOUT}")
    shutil.move(tmp_path / "weights", root / "unet/diffusion_pytorch_model.safetensors")
    config = (root / "unet/config.json").read_text()
    (root / "unet/config.json").write_text(config.replace('"FourierMLP"', '"VQModel"'))
    fails(f"{root / 'unet/config.json'} has _class_name 'VQModel'; expected one of UNet2DModel, FourierMLP")
    (root / "unet/config.json").write_text("{not json")
    fails(f"{root / 'unet/config.json'} is not readable JSON (Expecting property name enclosed in double quotes: "
          f"line 1 column 2 (char 1)); {LAYOUT}")
    (root / "unet/config.json").write_text(config)
    scheduler = root / "scheduler/scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "beta_schedule": "sigmoid"}))
    fails(f"{scheduler}: scheduler.beta_schedule: 'sigmoid' is not one of linear, scaled_linear, squaredcos_cap_v2")
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "noise"}))
    fails(f"{scheduler}: prediction_type 'noise' is not one of epsilon, sample, v_prediction")
    shutil.rmtree(root / "scheduler")
    fails(f"{root} has no scheduler/scheduler_config.json; {LAYOUT}")
    shutil.rmtree(root / "unet")
    fails(f"{root} has no unet/config.json; {LAYOUT}")
    shutil.rmtree(root)
    fails(f"{root} is not a directory; {LAYOUT}")


def test_bin_weights_load_without_diffusers_warning_of_unsafe_serialization(tmp_path, capfd):
    """A model saved with .bin weights only (older diffusers): the same weights, and none
    of the messages diffusers prints when it looks for safetensors first."""
    model = tiny_unet_model()
    save_pretrained(model, tmp_path / "m")
    unet = tmp_path / "m" / "unet"
    weights = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    capfd.readouterr()
    loaded = load_pretrained(tmp_path / "m", dtype=torch.float64)
    out, err = capfd.readouterr()
    assert "unsafe serialization" not in out + err and "An error occurred" not in out + err
    assert all(torch.equal(a, b) for a, b in zip(model.net.state_dict().values(), loaded.net.state_dict().values()))


@pytest.mark.parametrize("change,message", [
    ({"block_out_channels": [16384, 16384]}, "does not match the weights beside it: conv_in.weight is [16384, 2, 3, "
                                             "3] by the config and [8, 2, 3, 3] in the weights"),
    ({"layers_per_block": -1}, "has layers_per_block -1; expected whole numbers >= 1"),
    ({"layers_per_block": 2}, "does not match the weights beside it: "),
    ({"norm_num_groups": 0}, "has norm_num_groups 0; expected whole numbers >= 1"),
    ({"attention_head_dim": 0}, "has attention_head_dim 0; expected whole numbers >= 1"),
    ({"norm_num_groups": 3}, "does not describe a network that builds: "),
])
def test_a_network_config_that_does_not_build_or_match_its_weights_is_one_line(tmp_path, change, message):
    """Checked before any weight is loaded: the config builds on torch's meta device (no
    memory, so [16384, 16384] channels ask for nothing) and its parameters' shapes are
    compared with the safetensors header's."""
    save_pretrained(tiny_unet_model(), tmp_path / "m")
    config = tmp_path / "m/unet/config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path / "m")
    assert str(e.value).startswith(f"model.path: {config} {message}")


# -- schedules from scheduler configs -----------------------------------------------------

@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_from_scheduler_config_uses_diffusers_betas(beta_schedule):
    """At tau = (n+1)/N, alpha^2 is the float64 product of diffusers' own betas (1e-12)
    and its float32 alphas_cumprod (to float32 rounding)."""
    config = {"beta_schedule": beta_schedule, "num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03}
    sched = schedule_from_scheduler_config(config)
    ddpm = DDPMScheduler.from_config(config)
    n = torch.arange(500, dtype=torch.float64)
    t = 1 - (n + 1) / 500
    torch.testing.assert_close(sched.alpha(t) ** 2, torch.cumprod(1 - ddpm.betas.double(), 0), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.alpha(t) ** 2, ddpm.alphas_cumprod.double(), rtol=2e-6, atol=0)
    torch.testing.assert_close(sched.model_time(t), n, rtol=0, atol=1e-9)
    assert sched.scheduler_config == config


def test_linear_scheduler_config_matches_vp_discrete():
    """diffusers' float32 betas against VPDiscrete's float64 ones: below 1e-6 relative."""
    t = torch.linspace(0, 1 - 1e-3, 999)
    a, b = VPDiscrete(), schedule_from_scheduler_config({"beta_schedule": "linear"})
    assert ((a.alpha(t) ** 2 / b.alpha(t) ** 2) - 1).abs().max() < 1e-6
    assert a.scheduler_config == {"beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000,
                                  "beta_schedule": "linear"}


def test_scheduler_config_errors():
    with pytest.raises(ConfigError, match=r"^scheduler.rescale_betas_zero_snr: zero terminal SNR"):
        schedule_from_scheduler_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ConfigError, match=r"^scheduler: DDPMScheduler cannot use this config: linspace\(\) received"):
        schedule_from_scheduler_config({"beta_start": "small"})


# -- configs and builders -------------------------------------------------------------------

def test_model_configs_build_and_carry_the_paper_values():
    cfgs = {name: OmegaConf.load(f"{CONFIGS}/{name}.yaml") for name in ("unet", "unet_mnist", "unet_celeba")}
    for cfg in cfgs.values():
        cfg.seed = 0
        assert cfg.kind == "unet" and cfg.prediction == "epsilon"
        assert len(cfg.down_block_types) == len(cfg.up_block_types) == len(cfg.block_out_channels)
    mnist, celeba = cfgs["unet_mnist"], cfgs["unet_celeba"]
    assert (mnist.layers_per_block, list(mnist.block_out_channels), mnist.norm_num_groups) == (2, [32, 64, 128], 8)
    assert (celeba.layers_per_block, list(celeba.block_out_channels), celeba.norm_num_groups) == (
        2, [128, 256, 512, 512], 32)
    assert OmegaConf.load(f"{CONFIGS}/pretrained.yaml").kind == "pretrained"
    unet = build_unet(mnist, (1, 28, 28))
    assert unet.config.sample_size == 28 and len(unet.down_blocks) == 3
    small = build_network_model(cfgs["unet"], (1, 8, 8), VPDiscrete(), dtype=torch.float64)
    assert sum(p.numel() for p in small.net.parameters()) == sum(
        p.numel() for p in build_network_model(cfgs["unet"], (1, 8, 8), VPDiscrete()).net.parameters())
    # the same seed gives the same weights, whatever the global RNG
    torch.manual_seed(123)
    again = build_network_model(cfgs["unet"], (1, 8, 8), VPDiscrete(), dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(small.net.parameters(), again.net.parameters()))


def test_build_network_model_kinds(tmp_path):
    mlp_cfg = {"kind": "mlp", "hidden": 8, "depth": 1, "num_frequencies": 4, "fourier_scale": 2.0,
               "prediction": "v_prediction", "seed": 0}
    mlp = build_network_model(mlp_cfg, SHAPE, schedule_from_scheduler_config({}), dtype=torch.float64)
    assert mlp.net.config.dim == math.prod(SHAPE) and mlp.prediction.kind == "v_prediction"
    assert mlp.score(torch.zeros(1, *SHAPE), T).shape == (1, *SHAPE)
    save_pretrained(mlp, tmp_path / "m")
    loaded = build_network_model({"kind": "pretrained", "path": str(tmp_path / "m")}, SHAPE, VE(),
                                 dtype=torch.float64)
    assert isinstance(loaded.schedule, VPDiscrete)  # the scheduler config's, not the argument's
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    assert torch.equal(loaded.score(z, T), mlp.score(z, T))
    with pytest.raises(ConfigError, match=rf"^model.path: must be set; {LAYOUT}$"):
        build_network_model(OmegaConf.load(f"{CONFIGS}/pretrained.yaml"), SHAPE, VE())
    with pytest.raises(ConfigError) as e:
        build_network_model({"kind": "pretrained", "path": str(tmp_path / "m")}, (1, 8, 8), VE())
    assert str(e.value) == (f"model.path: the model at {tmp_path / 'm'} takes 128 coordinates, but the dataset "
                            f"gives samples of shape (1, 8, 8) (see dataset.image_size)")


@pytest.mark.parametrize("change,shape,message", [
    ({}, (2, 12, 12), None),
    ({}, (2, 9, 8), "model.block_out_channels: 2 levels need dataset.image_size divisible by 2^1 = 2; got 9x8"),
    ({"block_out_channels": [8, 16, 32]}, (2, 10, 10),
     "model.down_block_types: needs one block type per entry of model.block_out_channels (3), got 2"),
    ({"norm_num_groups": 3}, SHAPE, "model.norm_num_groups: must divide every entry of model.block_out_channels "
                                    "[8, 16], got 3"),
    ({"attention_head_dim": 16}, SHAPE, "model.attention_head_dim: must divide every entry of "
                                        "model.block_out_channels [8, 16], got 16"),
    ({"down_block_types": ["DownBlock2D", "NoSuchBlock2D"]}, SHAPE, "model: NoSuchBlock2D does not exist."),
    ({}, (64,), "model.kind: a UNet needs image data (channels, height, width), the dataset gives samples of "
                "shape (64,)"),
])
def test_build_unet_errors_are_one_line(change, shape, message):
    cfg = {**TINY_UNET, **change}
    if message is None:
        assert build_unet(cfg, shape).config.sample_size == 12
        return
    with pytest.raises(ConfigError) as e:
        build_unet(cfg, shape)
    assert str(e.value) == message
