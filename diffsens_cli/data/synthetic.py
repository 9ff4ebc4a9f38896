"""Synthetic data sets and perturbation measures from the ``dataset`` and ``perturbation``
groups, in closed form: isotropic Gaussian mixtures, points along a planar curve, and
empirical measures (listed points, a file of points, or draws from the target).

Every value read is checked and a bad one raises a ConfigError naming its key.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.core.forcing import Perturbation
from diffsens_cli.core.measures import GaussianMixture
from diffsens_cli.errors import ConfigError, listed, number, one_of, plain, require, whole


def _points(value, dim: int, key: str) -> torch.Tensor:
    """A list of points, each a scalar (that value in every coordinate) or ``dim`` values."""
    value = plain(value)
    if not isinstance(value, list):
        value = [value]
    rows = []
    for i, v in enumerate(value):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append([number(v, f"{key}[{i}]")] * dim)
        else:
            require(isinstance(v, list) and len(v) == dim, f"{key}[{i}]",
                    f"needs a scalar or {dim} values (the dataset's dim), got {v!r}")
            rows.append(listed(v, f"{key}[{i}]", number))
    return torch.tensor(rows, dtype=torch.float64)


def _per_component(value, k: int, key: str, positive: bool = False) -> torch.Tensor:
    value = plain(value)
    vals = listed(value, key, number) if isinstance(value, list) else [number(value, key)] * k
    require(len(vals) == k, key, f"needs one value or {k} (one per component), got {len(vals)}")
    require(all(v > 0 if positive else v >= 0 for v in vals), key,
            f"must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return torch.tensor(vals, dtype=torch.float64)


def _mixture(cfg: DictConfig, dim: int, group: str) -> GaussianMixture:
    means = _points(cfg.means, dim, f"{group}.means")
    k = means.shape[0]
    weights = _per_component(cfg.get("weights", 1.0), k, f"{group}.weights")
    require(weights.sum() > 0, f"{group}.weights", "must not all be zero")
    return GaussianMixture(means, _per_component(cfg.std, k, f"{group}.std"), weights)


def _curve(cfg: DictConfig) -> GaussianMixture:
    """Points along a planar curve with a small isotropic spread: rho 'on a curve'."""
    num_points = whole(cfg.num_points, "dataset.num_points", at_least=2)
    s = torch.linspace(-1.0, 1.0, num_points, dtype=torch.float64)
    shape = one_of(cfg.shape, ["sine", "arc"], "dataset.shape")
    if shape == "sine":
        pts = torch.stack([1.5 * s, 0.6 * torch.sin(math.pi * s)], 1)
    else:
        pts = torch.stack([torch.cos(math.pi * (s + 1) / 2), torch.sin(math.pi * (s + 1) / 2)], 1)
    return GaussianMixture(pts, _per_component(cfg.std, pts.shape[0], "dataset.std"), torch.ones(pts.shape[0]))


def _chessboard(cfg: DictConfig) -> GaussianMixture:
    """Lu et al.'s (2022) 2-D chessboard, eight squares of side 2 on [-4, 4]^2: ``num_points``
    uniform draws (seeded by ``dataset.seed``) as an empirical measure."""
    n = whole(cfg.num_points, "dataset.num_points", at_least=2)
    g = torch.Generator().manual_seed(whole(cfg.seed, "dataset.seed"))
    x1 = 4 * torch.rand(n, generator=g, dtype=torch.float64) - 2
    x2 = (torch.rand(n, generator=g, dtype=torch.float64) - 2 * torch.randint(0, 2, (n,), generator=g)
          + torch.floor(x1) % 2)
    return GaussianMixture.empirical(2 * torch.stack([x1, x2], 1))


def build_dataset(cfg: DictConfig) -> GaussianMixture:
    """The closed-form target measure rho of a synthetic data set."""
    kind = one_of(cfg.kind, ["gaussian_mixture", "curve", "chessboard"], "dataset.kind")
    dim = whole(cfg.dim, "dataset.dim", at_least=1)
    if kind in ("curve", "chessboard"):
        require(dim == 2, "dataset.dim", f"a {kind} data set lives in 2 dimensions")
        return _curve(cfg) if kind == "curve" else _chessboard(cfg)
    return _mixture(cfg, dim, "dataset")


def build_perturbation(cfg: DictConfig, target: GaussianMixture, seed: int = 0) -> Perturbation:
    """The perturbation measure nu (closed form), with its sign (add or remove)."""
    dim = target.dim
    kind = one_of(cfg.kind, ["gaussian", "gaussian_mixture", "empirical"], "perturbation.kind")
    sign = one_of(cfg.get("direction", "add"), ["add", "remove"], "perturbation.direction")
    if kind == "gaussian":
        mean = _points([plain(cfg.mean)], dim, "perturbation.mean")
        std = _per_component(cfg.std, 1, "perturbation.std", positive=True)
        measure = GaussianMixture(mean, std, torch.ones(1, dtype=torch.float64))
    elif kind == "gaussian_mixture":
        measure = _mixture(cfg, dim, "perturbation")
    else:
        measure = GaussianMixture.empirical(_empirical_points(cfg, target, seed))
    return Perturbation([measure], [1.0 if sign == "add" else -1.0])


def _empirical_points(cfg: DictConfig, target: GaussianMixture, seed: int) -> torch.Tensor:
    dim = target.dim
    if cfg.get("from_dataset") is not None:
        k = whole(cfg.from_dataset, "perturbation.from_dataset", at_least=1)
        return target.sample(k, torch.Generator().manual_seed(seed + 1))
    if cfg.get("path"):
        return torch.from_numpy(read_points(cfg.path, dim))
    require(cfg.get("points") is not None, "perturbation.points",
            "an empirical perturbation needs points, path or from_dataset")
    return _points(cfg.points, dim, "perturbation.points")


def read_points(value: object, dim: int, key: str = "perturbation.path") -> np.ndarray:
    """Finite float64 points [K >= 1, dim] from a .npy file (no pickles) or a text file of
    whitespace-separated rows; a one-line ConfigError naming ``key`` and the file otherwise."""
    expected = f"expected a .npy or .txt array [K, {dim}] of finite numbers"
    require(isinstance(value, str), key, f"must be a file name, got {value!r}")
    path = Path(value).expanduser()
    require(path.is_file(), key, f"no such file: {path} ({expected})")
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(key, f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                               f"{expected}") from None
    require(arr.dtype.kind in "biuf", key, f"{path} holds {arr.dtype} values; {expected}")
    require(arr.ndim in (1, 2) and arr.size > 0, key, f"{path} holds an array of shape {arr.shape}; {expected}")
    arr = arr.reshape(len(arr), -1).astype(np.float64)  # [K] is K points of dimension 1
    require(arr.shape[1] == dim, key, f"{path} holds points of dimension {arr.shape[1]}, "
            f"but the dataset has dim {dim}")
    require(bool(np.isfinite(arr).all()), key, f"{path} holds non-finite values (NaN or inf); {expected}")
    return arr
