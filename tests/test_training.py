"""Denoising score matching against closed forms, mixture draws, and exact resumption."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch
from helpers import train_settings_with
from torch import nn

from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VPLinear
from diffsens_cli.errors import DiffsensError
from diffsens_cli.models.network import FourierMLP, NetworkScore, Prediction
from diffsens_cli.training.dsm import dsm_loss
from diffsens_cli.training.trainer import Trainer

SCHED = VPLinear()


class OptimalGaussianDenoiser(nn.Module):
    """The exact noise or clean-sample predictor of the target N(mu, s^2 I), as a network
    of (z, model timestep)."""

    def __init__(self, mu: torch.Tensor, s: float, prediction: str):
        super().__init__()
        self.register_buffer("mu", mu)
        self.s, self.prediction = s, prediction

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = 1 - (timestep + 1) / SCHED.num_train_timesteps
        alpha, sigma = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
        c = alpha**2 * self.s**2 + sigma**2
        centred = z - alpha * self.mu
        return sigma * centred / c if self.prediction == "epsilon" else self.mu + alpha * self.s**2 * centred / c


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_dsm_loss_of_the_optimal_denoiser_is_the_posterior_variance(prediction):
    """For a Gaussian target the minimum DSM loss per coordinate is E_tau[alpha^2 s^2 / C]
    (noise) or E_tau[s^2 sigma^2 / C] (clean sample): a closed form, checked by quadrature."""
    d, s, t_min = 4, 0.3, 1e-3
    mu = torch.linspace(-1, 1, d, dtype=torch.float64)
    net = OptimalGaussianDenoiser(mu, s, prediction)
    x0 = mu + s * torch.randn(200_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss = dsm_loss(net, SCHED, Prediction(prediction), x0, t_min, torch.Generator().manual_seed(1))

    tau = torch.linspace(t_min, 1, 20_001, dtype=torch.float64)
    alpha, sigma = SCHED.alpha(1 - tau), SCHED.sigma(1 - tau)
    c = alpha**2 * s**2 + sigma**2
    integrand = alpha**2 * s**2 / c if prediction == "epsilon" else s**2 * sigma**2 / c
    expected = torch.trapezoid(integrand, tau) / (1 - t_min)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-2)


def test_retraining_mixture_draws_each_item_with_weight_eta():
    """rho^eta = 0.9 rho + 0.1 nu over two image sets of very different sizes: the share of
    S in the draws is eta (binomial 5-sigma), not |S| / (|rho| + |S|)."""
    rho = torch.zeros(1000, 1, 2, 2)
    s = torch.ones(20, 1, 2, 2)
    mix = GaussianMixture.empirical(rho).mix(GaussianMixture.empirical(s), 0.1)
    n = 40_000
    draws = mix.sample(n, torch.Generator().manual_seed(0))
    share = (draws[:, 0] == 1).double().mean().item()
    assert abs(share - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n)
    assert set(draws.unique().tolist()) == {0.0, 1.0}


def _trainer(tmp_path, **kw) -> Trainer:
    torch.manual_seed(0)
    model = NetworkScore(FourierMLP(3, hidden=16, num_frequencies=8), SCHED)
    target = GaussianMixture(torch.tensor([[-1.0] * 3, [1.0] * 3]), torch.tensor(0.1), torch.ones(2))
    settings = train_settings_with(**{"steps": 6, "batch_size": 32, "lr": 1e-2, "checkpoint_every": 3,
                                      "progress": False, **kw})
    return Trainer(model, target, (3,), settings, tmp_path / "checkpoints")


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, ema_decay):
    """6 steps straight against 3 steps, a new process-like trainer that resumes, then 3
    more: bitwise the same weights, losses and EMA; unfinished checkpoints are ignored."""
    straight = _trainer(tmp_path / "a", ema_decay=ema_decay)
    straight.train()

    first = _trainer(tmp_path / "b", ema_decay=ema_decay)
    first.train(until=3)
    (tmp_path / "b" / "checkpoints" / ".tmp-step-00000005").mkdir()  # a checkpoint cut off mid-write
    second = _trainer(tmp_path / "b", ema_decay=ema_decay)
    assert second.resume() and second.step == 3
    second.train()

    assert second.losses == straight.losses and len(second.losses) == 6
    for a, b in zip(straight.sampling_model().net.parameters(), second.sampling_model().net.parameters()):
        assert torch.equal(a, b)
    assert [p.name for p in second.checkpoints()] == ["step-00000003", "step-00000006"]
    assert not torch.equal(next(straight.sampling_model().net.parameters()),
                           next(_trainer(tmp_path / "c").sampling_model().net.parameters()))


def _weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.sampling_model().net.parameters()])


def test_the_fused_optimizer_and_ema_train_the_same_network_as_the_loops(tmp_path, float64_default):
    """train.fused (AdamW's fused kernel, the EMA's foreach update) against the per-tensor
    loops, in float64 with EMA and clipping: the same losses and weights to round-off."""
    loops = _trainer(tmp_path / "a", fused=False, ema_decay=0.9, grad_clip=0.5)
    fused = _trainer(tmp_path / "b", fused=True, ema_decay=0.9, grad_clip=0.5)
    loops.train()
    fused.train()
    assert loops.optimizer.optimizer.defaults["fused"] is None and fused.optimizer.optimizer.defaults["fused"]
    torch.testing.assert_close(fused.losses, loops.losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(_weights(fused), _weights(loops), rtol=1e-12, atol=1e-14)


def test_bf16_autocast_of_a_float64_network_is_refused(tmp_path, float64_default):
    """CPU autocast leaves float64 alone: bf16 would silently train in float64."""
    with pytest.raises(DiffsensError, match="^train.mixed_precision: bf16 autocast leaves a float64 network"):
        _trainer(tmp_path, mixed_precision="bf16")


def test_bf16_autocast_trains_near_float32_and_samples_in_float32(tmp_path):
    """train.mixed_precision=bf16 changes the training by bf16's rounding (about 2^-8
    relative per operation), not more; the sampling model computes in float32 outside
    any autocast, like the float32-trained one."""
    full = _trainer(tmp_path / "a")
    half = _trainer(tmp_path / "b", mixed_precision="bf16")
    full.train()
    half.train()
    rel = [abs(a - b) / abs(a) for a, b in zip(half.losses, full.losses, strict=True)]
    assert 0 < max(rel) < 0.05
    weights = _weights(half)
    assert 0 < float((weights - _weights(full)).norm() / _weights(full).norm()) < 0.05
    model = half.sampling_model()
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    out = model.net(z, torch.full((5,), 10.0))
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = model.net(z, torch.full((5,), 10.0))
    assert not torch.equal(out, in_bf16.float())  # so the first was not computed under autocast


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_a_stop_signal_mid_training_saves_the_step_it_ended_and_resumes_from_it(tmp_path, sig, monkeypatch):
    """SIGTERM, SIGUSR2 (Slurm's warning before a time limit) or Ctrl-C during step 5 of 9,
    with checkpoints due only every 100 steps: the step ends, a checkpoint of step 5 is
    written, the loop stops; a new trainer resumes from it to the same weights as a run
    that was never stopped."""
    from diffsens_cli import interrupt

    straight = _trainer(tmp_path / "a", steps=9, checkpoint_every=100)
    straight.train()
    previous = {s: signal.getsignal(s) for s in interrupt.STOP_SIGNALS}
    monkeypatch.setattr(interrupt, "_requested", None)
    stopped = _trainer(tmp_path / "b", steps=9, checkpoint_every=100)
    step = stopped.train_step

    def signalled_step():  # the signal lands in the middle of step 5 (0-based 4)
        if stopped.step == 4:
            os.kill(os.getpid(), sig)
        return step()

    monkeypatch.setattr(stopped, "train_step", signalled_step)
    try:
        interrupt.install()
        with pytest.raises(KeyboardInterrupt) as raised:
            stopped.train()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        monkeypatch.setattr(interrupt, "_requested", None)
    assert isinstance(raised.value, interrupt.Terminated) == (sig != signal.SIGINT)
    assert [p.name for p in stopped.checkpoints()] == ["step-00000005"]
    resumed = _trainer(tmp_path / "b", steps=9, checkpoint_every=100)
    assert resumed.resume() and resumed.step == 5
    resumed.train()
    assert resumed.losses == straight.losses
    for a, b in zip(straight.sampling_model().net.parameters(), resumed.sampling_model().net.parameters()):
        assert torch.equal(a, b)


def test_a_second_stop_signal_does_not_wait_for_the_step(monkeypatch):
    """Inside at_step_boundaries the first signal is only recorded; the second raises at once."""
    from diffsens_cli import interrupt

    previous = {s: signal.getsignal(s) for s in interrupt.STOP_SIGNALS}
    monkeypatch.setattr(interrupt, "_requested", None)
    try:
        interrupt.install()
        with interrupt.at_step_boundaries():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # recorded, not raised
            assert interrupt.requested() == signal.SIGTERM
            with pytest.raises(interrupt.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        monkeypatch.setattr(interrupt, "_requested", None)


@pytest.mark.parametrize("first,then,refusal", [
    ({}, {"lr": 0.5}, "train.lr: 0.01 -> 0.5"),
    ({}, {"ema_decay": 0.9}, "train.ema_decay: None -> 0.9"),
    ({"lr_scheduler": "linear"}, {"lr_scheduler": "linear", "steps": 9},
     "steps: 6 -> 9 (lr_scheduler linear depends on it)"),
    ({}, {"steps": 2}, "steps: 6 -> 2 (the checkpoint is at step 3)"),
    ({}, {"steps": 9, "checkpoint_every": 2, "keep_checkpoints": 5, "progress": True}, None),
    ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2},
     {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2, "steps": 4}, None),
])
def test_a_resume_with_other_settings_is_refused(tmp_path, first, then, refusal):
    """What a checkpoint was trained with must match, but for bookkeeping keys and a total
    that the lr schedule ignores (it may grow, or shrink to no less than the checkpoint's step)."""
    _trainer(tmp_path, **first).train(until=3)
    second = _trainer(tmp_path, **then)
    if refusal is None:
        assert second.resume() and second.step == 3
        return
    with pytest.raises(DiffsensError) as e:
        second.resume()
    ckpts = tmp_path / "checkpoints"
    assert str(e.value) == (f"checkpoint {ckpts / 'step-00000003'} was trained with other settings: {refusal}; "
                            f"to start afresh, use another hydra.run.dir or delete {ckpts}")
    assert second.step == 0 and [p.name for p in second.checkpoints()] == ["step-00000003"]


def test_horizontal_flips_mirror_about_half_of_a_batch(tmp_path):
    """hflip: each image is itself or its exact left-right mirror, each with probability 1/2."""
    image = torch.arange(12.0).view(1, 1, 3, 4)
    settings = train_settings_with(steps=1, batch_size=4000, hflip=True, progress=False)
    model = NetworkScore(FourierMLP(12, hidden=8, num_frequencies=4), SCHED)
    trainer = Trainer(model, GaussianMixture.empirical(image), (1, 3, 4), settings, tmp_path)
    batch = trainer._batch(torch.Generator().manual_seed(0))
    flipped = (batch == image.flip(-1)).flatten(1).all(1)
    assert (flipped | (batch == image).flatten(1).all(1)).all()
    assert abs(flipped.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / 4000)


def test_a_non_finite_loss_stops_the_training_at_its_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    """Weights poisoned after step 3's checkpoint: step 4's loss is NaN, the training stops
    in one line naming step 4, and no checkpoint of the poisoned weights is written."""
    trainer = _trainer(tmp_path)
    trainer.train(until=3)
    with torch.no_grad():
        next(trainer.net.parameters()).fill_(math.nan)
    with pytest.raises(DiffsensError, match=r"^training: the loss became nan at step 4; stopped there, nothing "
                                            r"saved after it \(the last checkpoint, step-00000003, is kept\)"):
        trainer.train()
    assert [p.name for p in trainer.checkpoints()] == ["step-00000003"] and len(trainer.losses) == 3


def test_non_finite_weights_are_never_saved_as_a_checkpoint(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        next(trainer.net.parameters()).fill_(math.inf)
    with pytest.raises(DiffsensError, match=r"^training: the weights are not finite at step 0; stopped, nothing "
                                            r"saved after step 0"):
        trainer.save_checkpoint()
    assert trainer.checkpoints() == []
