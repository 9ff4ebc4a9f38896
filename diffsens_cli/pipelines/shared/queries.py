"""Query samples a user brings to the influence task, in place of the pool's: images
generated elsewhere (``influence.queries``, a dataset config such as image_folder or
arrays) mapped to their starting noise by the probability-flow ODE run backwards, with
how well the forward pass reproduces each; or that noise itself (``influence.query_z0``,
an ``.npy`` file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.builders import solver_settings
from diffsens_cli.core.integrate import Integrator
from diffsens_cli.core.score_model import ScoreModel
from diffsens_cli.data.base import at_side
from diffsens_cli.errors import ConfigError, plain, require
from diffsens_cli.rundir import RunDir
from diffsens_cli.stages import content_key

# A query whose forward pass misses its image by more than this (relative L2) is told of.
RECONSTRUCTION_WARNING = 0.05


@dataclass
class Queries:
    """The queries' starting points z0 [Q, *event]; for queried images, the images and the
    forward pass from z0 (on the CPU) and their names (or None)."""

    z0: torch.Tensor
    images: torch.Tensor | None = None
    reconstructed: torch.Tensor | None = None
    names: list[str] | None = None

    def relative_error(self) -> np.ndarray | None:
        """|forward(z0) - image| / |image| per query (None without images)."""
        if self.images is None or self.reconstructed is None:
            return None
        diff = (self.reconstructed - self.images).flatten(1).norm(dim=1)
        return (diff / self.images.flatten(1).norm(dim=1)).numpy()


def given(cfg: DictConfig) -> str | None:
    """Which kind of queries the run has: ``queries``, ``query_z0`` or None (the pool's)."""
    ic = cfg.influence
    kinds = [k for k in ("queries", "query_z0") if ic.get(k) is not None]
    require(len(kinds) <= 1, "influence.query_z0", "set either influence.queries (images) or query_z0 (their noise)")
    return kinds[0] if kinds else None


def queries_config(cfg: DictConfig, event_shape: tuple[int, ...]) -> dict[str, Any]:
    """``influence.queries`` read at rho's image side unless it sets its own."""
    queries = plain(cfg.influence.queries)
    require(isinstance(queries, dict) and "kind" in queries, "influence.queries",
            "must be null or a dataset config: +dataset@influence.queries=image_folder influence.queries.root=DIR")
    return at_side(queries, event_shape[-1])


def check(cfg: DictConfig, event_shape: tuple[int, ...]) -> None:
    """The queries' settings against the shape of the model's samples, before any work."""
    kind = given(cfg)
    if kind == "query_z0":
        _read_z0(cfg, event_shape)
    elif kind == "queries":
        from diffsens_cli.data import check_images

        require(len(event_shape) == 3, "influence.queries",
                "queried images need an image data set; on synthetic data give their noise as influence.query_z0")
        shape = check_images(queries_config(cfg, event_shape), key="influence.queries")
        require(tuple(shape) == tuple(event_shape), "influence.queries",
                f"images are {'x'.join(map(str, shape))}, but the model's samples are "
                f"{'x'.join(map(str, event_shape))} (channels x height x width)")
    if kind is not None:
        require(cfg.task == "influence", f"influence.{kind}", f"queries are read by the influence task, not {cfg.task}")
        require(cfg.solver.method == "ode", "solver.method", "queries are mapped to and from noise by the PF-ODE: "
                "method=ode")


def _read_z0(cfg: DictConfig, event_shape: tuple[int, ...]) -> torch.Tensor:
    path = Path(str(cfg.influence.query_z0)).expanduser()
    require(path.is_file() and path.suffix == ".npy", "influence.query_z0", f"{path} is not an .npy file")
    try:
        z0 = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError("influence.query_z0", f"{path} is not a readable NumPy array ({e})") from None
    require(z0.dtype.kind == "f" and z0.ndim >= 2 and len(z0) >= 1 and bool(np.isfinite(z0).all()),
            "influence.query_z0", f"{path} must hold finite floats [Q, *sample shape], got {z0.dtype} "
            f"{list(z0.shape)}")
    require(tuple(z0.shape[1:]) == tuple(event_shape), "influence.query_z0",
            f"{path} holds starting points of shape {list(z0.shape[1:])}, but the model's samples are "
            f"{list(event_shape)}")
    return torch.from_numpy(z0)


def load(cfg: DictConfig, run: RunDir, model: ScoreModel, model_key: Any, like: torch.Tensor) -> Queries | None:
    """The run's queries (None: the pool's samples), on ``like``'s device and dtype; queried
    images are inverted once, in the stage ``invert_queries``."""
    kind = given(cfg)
    if kind == "query_z0":
        return Queries(_read_z0(cfg, tuple(like.shape[1:])).to(like.device, like.dtype))
    if kind is None:
        return None
    from diffsens_cli.data import load_images
    from diffsens_cli.pipelines.shared.image_stages import solver_depends

    loaded = load_images(queries_config(cfg, tuple(like.shape[1:])), key="influence.queries", cache=run.cache.arrays)
    images = loaded.images.to(like.device, like.dtype)

    def compute() -> dict[str, np.ndarray]:
        integrator = Integrator(model, solver_settings(cfg.solver))  # paths only: no density, no tangents
        z0 = integrator.invert(images)
        return {"z0": z0.cpu().numpy(), "reconstructed": integrator.run(z0).samples.numpy()}

    depends = {"model": model_key, "solver": solver_depends(cfg.solver), "images": content_key(images.cpu().numpy())}
    stage = run.cache.arrays("invert_queries", depends, compute)
    names = loaded.names or [f"query {i}" for i in range(len(images))]
    out = Queries(torch.from_numpy(stage["z0"]).to(like.device, like.dtype), images.cpu(),
                  torch.from_numpy(stage["reconstructed"]), names)
    error = out.relative_error()
    worst = int(np.argmax(error))
    if error[worst] > RECONSTRUCTION_WARNING:
        run.warn(f"influence.queries: the PF-ODE from the inverted noise misses {names[worst]} by "
                 f"{error[worst]:.1%} (relative L2): its attribution is of the sample it reproduces; "
                 "more solver steps, or solver=accurate, invert more exactly")
    return out
