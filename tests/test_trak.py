"""D-TRAK (core.trak): the output function against hand formulas, per-example gradients
against backward passes and finite differences on the digits UNet, the chunked projection
against its dense matrix, and the TRAK kernel against direct solves and its invariance
under an invertible projection."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffsens_cli.core.trak import (
    DTrakSettings,
    dtrak_output,
    output_pairs,
    per_example_gradients,
    random_projection,
    relative_damping,
    trak_features,
    trak_scores,
)
from diffsens_cli.models.network import NetworkScore
from diffsens_cli.models.pretrained import schedule_from_scheduler_config
from diffsens_cli.models.unet import build_network_model

UNET = Path(__file__).resolve().parents[1] / "configs/model/unet.yaml"
EVENT = (1, 2, 2)  # TinyNet's images: d = 4, P = 4 * 4 + 4 = 20 trainable parameters

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small networks are many small ops: a second thread only adds barrier waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyNet(nn.Module):
    """``out = tanh(W tanh(z) + b) + c * timestep / 1000`` on flattened images; ``c`` is frozen
    (must not count).  The tanh keep the 30 images' gradients full rank: with ``W z`` they are
    quadratic in the image (at most 15 dimensions), and with ``W tanh(z) + b`` rotations of the
    output that fix ``c`` leave every ``|eps_hat|^2`` unchanged (3 null directions)."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(d, d, generator=g) / math.sqrt(d))
        self.bias = nn.Parameter(torch.randn(d, generator=g))
        self.frozen = nn.Parameter(torch.randn(d, generator=g), requires_grad=False)

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = (z.flatten(1).tanh() @ self.weight.T + self.bias).tanh() + self.frozen * timestep[:, None] / 1000
        return out.view_as(z)


def tiny_model(prediction: str = "epsilon") -> NetworkScore:
    return NetworkScore(TinyNet(math.prod(EVENT)), schedule_from_scheduler_config({"beta_schedule": "linear"}),
                        prediction)


def digits_unet() -> NetworkScore:
    """The UNet of configs/model/unet.yaml for 1x8x8 digits, in float64."""
    cfg = OmegaConf.load(UNET)
    cfg.seed = 0
    return build_network_model(cfg, (1, 8, 8), schedule_from_scheduler_config({"beta_schedule": "linear"}),
                               dtype=torch.float64)


def images(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def loop_gradients(model: NetworkScore, x: torch.Tensor, times: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One backward pass per image, gradients flattened in named_parameters order."""
    trainable = [p for _, p in model.net.named_parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        model.net.zero_grad()
        dtrak_output(model, x[i:i + 1], times, noise)[0].backward()
        rows.append(torch.cat([p.grad.flatten() for p in trainable]))
    return torch.stack(rows)


def test_output_pairs_are_evenly_spaced_times_with_seeded_noises_the_same_in_every_dtype():
    times, noise = output_pairs(4, 3, (1, 2, 2), seed=5, dtype=torch.float64, device="cpu")
    tau = torch.tensor([0.125, 0.375, 0.625, 0.875])
    assert torch.equal(times, (1 - tau).repeat_interleave(3)) and noise.shape == (12, 1, 2, 2)
    assert len({tuple(e.flatten().tolist()) for e in noise}) == 12  # a new noise for every pair
    times32, noise32 = output_pairs(4, 3, (1, 2, 2), seed=5, dtype=torch.float32, device="cpu")
    assert torch.equal(noise32, noise.float()) and torch.equal(times32, times.float())
    assert not torch.allclose(output_pairs(4, 3, (1, 2, 2), seed=6, dtype=torch.float64, device="cpu")[1], noise)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction", "score"])
def test_output_is_the_mean_squared_norm_of_the_implied_noise(prediction):
    """f by hand for TinyNet: the noise each prediction type implies at z, eps_hat
    = out, (z - alpha out) / sigma, (sigma z + alpha out) / (alpha^2 + sigma^2), -sigma out."""
    model = tiny_model(prediction)
    x = images(3, EVENT)
    times, noise = output_pairs(3, 2, EVENT, seed=0, dtype=torch.float64, device="cpu")
    net, sched = model.net, model.schedule
    expected = torch.zeros(3)
    for n in range(3):
        for t, eps in zip(times, noise, strict=True):
            alpha, sigma = sched.alpha(t), sched.sigma(t)
            z = (alpha * x[n] + sigma * eps).flatten()
            out = (net.weight @ z.tanh() + net.bias).tanh() + net.frozen * (1000 * (1 - t) - 1) / 1000
            eps_hat = {"epsilon": out, "sample": (z - alpha * out) / sigma,
                       "v_prediction": (sigma * z + alpha * out) / (alpha**2 + sigma**2), "score": -sigma * out}
            expected[n] += eps_hat[prediction].pow(2).sum() / len(times)
    torch.testing.assert_close(dtrak_output(model, x, times, noise), expected, rtol=1e-13, atol=0)


def test_per_example_gradients_count_trainable_parameters_only_and_equal_backward_passes():
    model = tiny_model()
    x = images(4, EVENT)
    times, noise = output_pairs(2, 2, EVENT, seed=0, dtype=torch.float64, device="cpu")
    grads = per_example_gradients(model, x, times, noise)
    assert grads.shape == (4, 20)
    torch.testing.assert_close(grads, loop_gradients(model, x, times, noise), rtol=1e-12, atol=1e-14)


def test_per_example_gradients_of_the_digits_unet_equal_backward_passes_and_finite_differences():
    model = digits_unet()
    x = images(2, (1, 8, 8))
    times, noise = output_pairs(2, 2, (1, 8, 8), seed=0, dtype=torch.float64, device="cpu")
    grads = per_example_gradients(model, x, times, noise)
    assert grads.shape == (2, sum(p.numel() for p in model.net.parameters()))
    torch.testing.assert_close(grads, loop_gradients(model, x, times, noise), rtol=1e-10, atol=1e-12)

    params = {k: p.detach() for k, p in model.net.named_parameters()}
    g = torch.Generator().manual_seed(2)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    norm = torch.cat([d.flatten() for d in direction.values()]).norm()
    direction = {k: d / norm for k, d in direction.items()}  # a unit step: central differences err by O(h^2)
    v = torch.cat([d.flatten() for d in direction.values()])
    h = 1e-4
    f_plus, f_minus = (dtrak_output(model, x, times, noise, {k: p + s * h * direction[k] for k, p in params.items()})
                       for s in (1, -1))
    torch.testing.assert_close((f_plus - f_minus) / (2 * h), grads @ v, rtol=1e-8, atol=0)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 64])
def test_chunked_projection_is_one_dense_sign_matrix_whatever_the_batching(chunk_rows):
    p, k, seed = 37, 13, 3
    dense = random_projection(torch.eye(p), k, seed, chunk_rows)  # R itself, row by row of the identity
    assert dense.shape == (p, k) and torch.equal(dense.abs(), torch.full((p, k), 1 / math.sqrt(k)))
    assert torch.equal(torch.cat([random_projection(torch.eye(p)[s:s + 10], k, seed, chunk_rows)
                                  for s in range(0, p, 10)]), dense)
    grads = images(7, (p,))
    full = random_projection(grads, k, seed, chunk_rows)
    torch.testing.assert_close(full, grads @ dense, rtol=0, atol=1e-12)
    batched = torch.cat([random_projection(grads[a:b], k, seed, chunk_rows) for a, b in ((0, 1), (1, 4), (4, 7))])
    torch.testing.assert_close(batched, full, rtol=0, atol=1e-12)
    assert not torch.equal(random_projection(torch.eye(p), k, seed + 1, chunk_rows), dense)
    if chunk_rows < p:  # each chunk has its own generator
        assert not torch.equal(dense[:chunk_rows], dense[chunk_rows:2 * chunk_rows])


def test_projection_signs_are_balanced_and_columns_uncorrelated():
    """R^T R = (P / k) I in expectation: a bit unpacked twice or a chunk repeated would show."""
    p, k = 4096, 64
    dense = random_projection(torch.eye(p), k, seed=0, chunk_rows=100)
    gram = dense.T @ dense * k / p
    assert (gram.diagonal() == 1).all()
    assert (gram - torch.eye(k)).abs().max() < 0.1  # off-diagonal standard deviation 1/64
    assert dense.sum().abs() * math.sqrt(k) < 5 * math.sqrt(p * k)


def test_features_do_not_depend_on_the_batch_size():
    model = tiny_model()
    x = images(9, EVENT)
    settings = DTrakSettings(timesteps=3, noises=2, projection_dim=16, chunk_rows=7, seed=4)
    features = trak_features(model, x, settings)
    times, noise = output_pairs(3, 2, EVENT, seed=4, dtype=torch.float64, device="cpu")
    direct = random_projection(per_example_gradients(model, x, times, noise), 16, 4, 7)
    torch.testing.assert_close(features, direct, rtol=0, atol=1e-12)
    for batch_size in (1, 4):
        other = trak_features(model, x, replace(settings, batch_size=batch_size))
        torch.testing.assert_close(other, features, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n,k", [(12, 5), (5, 12)])
def test_kernel_equals_a_direct_solve_in_both_forms(n, k):
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(n, k, generator=g), torch.randn(4, k, generator=g)
    lam = 0.3
    direct = query @ torch.linalg.solve(train.T @ train + lam * torch.eye(k), train.T)
    for gram in (None, True, False):
        torch.testing.assert_close(trak_scores(train, query, lam, gram), direct, rtol=1e-10, atol=1e-12)


def test_relative_damping_makes_scores_independent_of_the_features_scale():
    g = torch.Generator().manual_seed(1)
    train, query = torch.randn(10, 6, generator=g), torch.randn(3, 6, generator=g)
    lam = relative_damping(train, 0.01)
    assert lam == pytest.approx(0.01 * torch.trace(train.T @ train).item() / 6, rel=1e-14)
    scaled = trak_scores(7 * train, 7 * query, relative_damping(7 * train, 0.01))
    torch.testing.assert_close(scaled, trak_scores(train, query, lam), rtol=1e-10, atol=1e-12)


def test_scores_of_features_projected_to_all_p_dimensions_equal_those_of_the_full_gradients():
    """phi G (G^T Phi^T Phi G)^-1 G^T Phi^T = phi (Phi^T Phi)^-1 Phi^T for invertible G: with
    k = P the projection changes nothing (N = 30 > P = 20, lambda = 0); with k < P it does."""
    model = tiny_model()
    train, query = images(30, EVENT, seed=1), images(4, EVENT, seed=2)
    settings = DTrakSettings(timesteps=3, noises=2, projection_dim=20, chunk_rows=8)
    times, noise = output_pairs(3, 2, EVENT, seed=0, dtype=torch.float64, device="cpu")
    full = trak_scores(per_example_gradients(model, train, times, noise),
                       per_example_gradients(model, query, times, noise), 0.0)
    assert torch.linalg.matrix_rank(random_projection(torch.eye(20), 20, 0, 8)) == 20
    projected = trak_scores(trak_features(model, train, settings), trak_features(model, query, settings), 0.0)
    torch.testing.assert_close(projected, full, rtol=1e-7, atol=1e-9)
    fewer = replace(settings, projection_dim=10)
    assert not torch.allclose(trak_scores(trak_features(model, train, fewer), trak_features(model, query, fewer), 0.0),
                              full, rtol=1e-3, atol=1e-3)


def test_settings_reject_empty_sizes_and_negative_damping():
    with pytest.raises(ValueError, match="projection_dim"):
        DTrakSettings(projection_dim=0)
    with pytest.raises(ValueError, match="damping"):
        DTrakSettings(damping=-1.0)
