"""Models saved by diffusers pipelines (``DDPMPipeline``/``DDIMPipeline.save_pretrained``,
with any scheduler whose noise schedule is a discrete VP one) load as they are: the
schedule against the betas diffusers computes from the same config, the score against the
network called directly, class-conditional UNets asked for ``model.class_label``, and
the schedulers and settings diffsens cannot read refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)

from diffsens_cli.errors import ConfigError
from diffsens_cli.models.pretrained import load_pretrained
from diffsens_cli.models.unet import check_network

SHAPE = (1, 8, 8)
T = torch.tensor(0.37, dtype=torch.float64)


def unet(**kw) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **kw).double()


def direct_score(net: UNet2DModel, model, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The epsilon network's score by hand: s = -eps / sigma at the model's own timestep."""
    sched = model.schedule
    eps = net(z, sched.model_time(T).expand(len(z)), class_labels=labels).sample
    return -eps / sched.sigma(T)


@pytest.mark.parametrize("pipeline", [DDPMPipeline, DDIMPipeline])
def test_a_saved_pipeline_loads_with_its_schedule_and_score(tmp_path, pipeline):
    net = unet()
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=400)
    pipeline(unet=net, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    check_network({"kind": "pretrained", "path": str(tmp_path / "pipe"), "class_label": None}, SHAPE)
    model = load_pretrained(tmp_path / "pipe", dtype=torch.float64)
    z = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.score(z, T), direct_score(net, model, z), rtol=1e-10, atol=1e-10)
    n = torch.arange(400, dtype=torch.float64)
    torch.testing.assert_close(model.schedule.alpha(1 - (n + 1) / 400) ** 2,
                               torch.cumprod(1 - scheduler.betas.double(), 0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler,
                                       EulerDiscreteScheduler])
def test_every_discrete_vp_scheduler_gives_the_betas_ddpm_computes_from_its_config(tmp_path, scheduler):
    DDPMPipeline(unet=unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    sampler = scheduler(beta_start=2e-4, beta_end=0.03, beta_schedule="scaled_linear", num_train_timesteps=300,
                        prediction_type="v_prediction")
    sampler.save_config(tmp_path / "pipe" / "scheduler")
    assert json.loads((tmp_path / "pipe/scheduler/scheduler_config.json").read_text())["_class_name"] == \
        scheduler.__name__
    model = load_pretrained(tmp_path / "pipe", dtype=torch.float64)
    reference = DDPMScheduler(beta_start=2e-4, beta_end=0.03, beta_schedule="scaled_linear", num_train_timesteps=300)
    n = torch.arange(300, dtype=torch.float64)
    torch.testing.assert_close(model.schedule.alpha(1 - (n + 1) / 300) ** 2,
                               torch.cumprod(1 - reference.betas.double(), 0), rtol=1e-12, atol=0)
    assert model.prediction.kind == "v_prediction"


def test_a_scheduler_without_a_discrete_vp_schedule_is_one_line(tmp_path):
    DDPMPipeline(unet=unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    file = tmp_path / "pipe/scheduler/scheduler_config.json"
    file.write_text(json.dumps({"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 2000,
                                "sigma_min": 0.01, "sigma_max": 1348.0}))
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path / "pipe")
    assert str(e.value).startswith(f"model.path: {file}: scheduler._class_name: 'ScoreSdeVeScheduler' is not a "
                                   "scheduler with a discrete VP noise schedule diffsens reads (one of DDPMScheduler")
    index = tmp_path / "pipe/model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "vqvae": ["diffusers", "VQModel"]}))
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path / "pipe")
    assert str(e.value) == (f"model.path: {index} lists a vqvae: a latent diffusion model's scores live in its "
                            "latent space, not on the images diffsens reads")


def test_a_class_conditional_unet_is_asked_for_model_class_label(tmp_path):
    net = unet(num_class_embeds=3)
    DDPMPipeline(unet=net, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    path = str(tmp_path / "pipe")
    z = torch.randn(2, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scores = {}
    for label in (0, 2):
        check_network({"kind": "pretrained", "path": path, "class_label": label}, SHAPE)
        model = load_pretrained(path, dtype=torch.float64, label=label)
        scores[label] = model.score(z, T)
        torch.testing.assert_close(scores[label], direct_score(net, model, z, torch.full((2,), label)),
                                   rtol=1e-10, atol=1e-10)
    assert (scores[0] - scores[2]).abs().max() > 1e-3  # the class matters
    for label, message in [(None, "model.class_label: the model at {p} is class-conditional (3 classes): set it to "
                                  "one of 0..2"),
                           (3, "model.class_label: must be in 0..2 ({p} has 3 classes), got 3"),
                           (-1, "model.class_label: must be a whole number >= 0, got -1")]:
        with pytest.raises(ConfigError) as e:
            check_network({"kind": "pretrained", "path": path, "class_label": label}, SHAPE)
        assert str(e.value) == message.format(p=Path(path))
    DDPMPipeline(unet=unet(), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path / "plain", label=1)
    assert str(e.value) == (f"model.class_label: must be null: the model at {tmp_path / 'plain'} is not "
                            "class-conditional (no num_class_embeds), got 1")
