"""The diffusion Fisher's trace (related paper, Table 2): the chessboard, the exact trace against
the closed-form score Jacobian, the VJP and DF-TM formulas with exact ingredients, the
second-moment head's training, and the experiment end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import diffsens, train_settings_with
from omegaconf import OmegaConf

from diffsens_cli.core.closed_form import MixtureScore
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.core.schedule import VE
from diffsens_cli.data.synthetic import build_dataset
from diffsens_cli.pipelines.fisher_trace import PAPER_TABLE2, df_tm_trace, exact_trace, hutchinson_trace, vjp_trace

F64 = torch.float64


def chessboard(n: int = 2000) -> GaussianMixture:
    return build_dataset(OmegaConf.create({"kind": "chessboard", "dim": 2, "num_points": n, "seed": 0}))


def test_chessboard_points_fill_the_eight_black_squares():
    points = chessboard().means
    assert points.abs().max() <= 4
    squares = torch.floor(points / 2).long()
    assert ((squares.sum(1) % 2) == 0).all()  # black squares only
    counts = torch.unique(squares, dim=0, return_counts=True)[1]
    assert len(counts) == 8 and counts.min() > 200  # 2000 points, about 250 a square


class OracleHead(torch.nn.Module):
    """E[x0_i^2 | z] of the exact posterior at one time: what a perfect DF-TM head outputs."""

    def __init__(self, measure: GaussianMixture, alpha: torch.Tensor, sigma: torch.Tensor):
        super().__init__()
        self.measure, self.alpha, self.sigma = measure, alpha, sigma

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        mean, cov = self.measure.posterior_moments(z, self.alpha, self.sigma)
        return cov.diagonal(dim1=-2, dim2=-1) + mean**2


@pytest.mark.parametrize("tau", [1.0, 0.4, 0.2, 0.0])
def test_exact_ingredients_give_the_exact_trace_every_way(tau):
    """Eq. 16 (the proxy-score covariance) equals -tr J s of the closed-form score Jacobian; the
    VJP trace of the exact score model and DF-TM's Eq. 17 with a perfect head and the exact
    clean-sample prediction both equal it; one Hutchinson probe is unbiased for it."""
    measure = chessboard(300)
    schedule = VE()
    model = MixtureScore(measure, schedule)
    t = torch.tensor(1 - tau, dtype=F64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    z = measure.sample_diffused(64, alpha, sigma, torch.Generator().manual_seed(0))
    exact = exact_trace(measure, z, alpha, sigma)
    scale = 2 / sigma**2
    torch.testing.assert_close(exact, -measure.diffused(z, alpha, sigma, trace=True).trace, rtol=1e-9,
                               atol=1e-9 * scale)
    torch.testing.assert_close(vjp_trace(model, z, t), exact, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(df_tm_trace(OracleHead(measure, alpha, sigma), model, z, t), exact, rtol=1e-7,
                               atol=1e-7 * scale)
    g = torch.Generator().manual_seed(1)
    probes = torch.stack([hutchinson_trace(model, z, t, g) for _ in range(4000)])
    spread = probes.std(0) / 4000**0.5
    assert ((probes.mean(0) - exact).abs() <= 5 * spread + 1e-9 * scale).all()


def test_a_trainer_with_the_second_moment_loss_learns_e_x0_squared():
    """One point mass at (1.5, -0.5): the head's target x0^2 is (2.25, 0.25) whatever z is; a
    small MLP trained with the loss hook gets there (a DSM-trained net would predict noise)."""
    from diffsens_cli.models.unet import build_network_model
    from diffsens_cli.training.dsm import second_moment_loss
    from diffsens_cli.training.trainer import Trainer

    schedule = VE()
    point = GaussianMixture.empirical(torch.tensor([[1.5, -0.5]]))
    cfg = OmegaConf.create({"kind": "mlp", "hidden": 32, "depth": 2, "num_frequencies": 8, "fourier_scale": 2.0,
                            "prediction": "sample", "seed": 0})
    settings = train_settings_with(steps=300, batch_size=256, lr=1e-2, checkpoint_every=10_000, progress=False)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(build_network_model(cfg, (2,), schedule), point, (2,), settings, Path(tmp),
                          loss=second_moment_loss)
        trainer.train()
        net = trainer.sampling_model().net
    z = torch.randn(100, 2) * 5
    out = net(z, torch.full((100,), 500.0)).detach()
    torch.testing.assert_close(out.mean(0), torch.tensor([2.25, 0.25]), rtol=0, atol=0.1)


def test_experiment_runs_and_writes_the_table(tmp_path):
    """Smoke test end to end (networks of 30 steps, so no accuracy is asserted; the formulas are
    checked above): the table has the paper's six times with its numbers beside ours, and the
    log-density comparison and the costs are in summary.json."""
    out = tmp_path / "run"
    r = diffsens("run", "experiment=fisher_trace_chessboard", "size=tiny", f"hydra.run.dir={out}",
                 "solver.progress=false", "fisher_trace.times=[1.0,0.8,0.6,0.4,0.2,0.0]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert list(metrics["table"]) == ["1.0", "0.8", "0.6", "0.4", "0.2", "0.0"]
    for key, row in metrics["table"].items():
        for name in ("vjp", "df_tm"):
            assert row[name]["paper"] == PAPER_TABLE2[name][key] and row[name]["relative_error"] >= 0
    assert set(metrics["log_density"]) == {"df_tm", "hutchinson_1"}
    assert set(metrics["seconds_per_evaluation"]) == {"exact", "df_tm", "hutchinson_1"}
    assert (out / "table2_fisher_trace.png").stat().st_size > 1000
