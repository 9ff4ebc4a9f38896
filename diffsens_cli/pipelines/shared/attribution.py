"""The score sets of the attribution methods, side by side on the same model and samples
(docs/attribution.md: "Which attribution to use"), and the numbers that say what the weight clamp does.

Each method gives every training image n a score for each model sample, higher meaning
more influential (ranked first):

- ``ours_clamped``, ``ours_exact``: ``|psi^n|`` with the weights ``nu_t / rho_t`` clamped to
  ``influence.clamp`` (the paper's [0.1, 10]) or exact (log space, unclamped); one adjoint
  pass gives both (``pipelines.influence.group_stage``).  ``ours`` is whichever
  ``influence.weights`` selects.
- ``ours_set``: the greedy order for removing images together (``core.attribution.set_order``)
  on ``ours``' sensitivities, as scores N (first) .. 1 (last).
- ``ours_loss``: ``-dL/d eta_n``, the first-order fall of the sample's denoising loss
  (``core.attribution.loss_sensitivity``, under ``influence.loss_weights``): signed,
  proponents first.
- ``l2``: minus the pixel distance (nearest first).
- ``feature``: cosine similarity in the penultimate features of a CNN classifier of the
  training images (``crossclass.fit_cnn``).
- ``dtrak``: the D-TRAK/TRAK kernel on projected gradients of the mean squared predicted
  noise (``core.trak``).

``random`` and ``least`` (ours' bottom) are rankings without score sets of their own.
``ours_loss``, ``feature`` and ``dtrak`` are stages of their own per model sample (and
``feature`` and ``dtrak`` one for the training images' features), so adding one to a
finished run computes only it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.core import attribution
from diffsens_cli.core.compare import linear_fit, spearman_rows
from diffsens_cli.core.score_sensitivity import WeightStats
from diffsens_cli.errors import listed, number, one_of, plain, require, whole
from diffsens_cli.stages import ArrayDict

WEIGHTS = ("clamped", "exact")
METHODS = ("ours_exact", "ours_clamped", "ours_set", "ours_loss", "l2", "feature", "dtrak")
RANKINGS = (*METHODS, "ours", "random", "least")
STAGED = ("ours_loss", "feature", "dtrak")  # score sets with stages of their own


def weights(cfg: DictConfig) -> str:
    """The weights of ``ours``, ``ours_set`` and the singular directions."""
    return one_of(cfg.influence.weights, WEIGHTS, "influence.weights")


def loss_weights(cfg: DictConfig) -> str:
    """The weights of ``ours_loss``: its own setting, as its LDS wants the clamp where
    ``|psi^n|``'s does not (docs/attribution.md: "Which attribution to use")."""
    return one_of(cfg.influence.loss_weights, WEIGHTS, "influence.loss_weights")


def clamp(cfg: DictConfig) -> tuple[float, float]:
    """``influence.clamp`` as (low, high), checked."""
    values = listed(cfg.influence.clamp, "influence.clamp", number)
    require(len(values) == 2 and 0 < values[0] < values[1], "influence.clamp",
            f"must be [low, high] with 0 < low < high, got {values}")
    return float(values[0]), float(values[1])


def clamps(cfg: DictConfig) -> dict[str, tuple[float, float] | None]:
    """The weight clamps of one adjoint pass by name, ``influence.weights``' first (its
    singular directions are the ones kept)."""
    both = {"clamped": clamp(cfg), "exact": None}
    return {w: both[w] for w in sorted(WEIGHTS, key=lambda w: w != weights(cfg))}


def methods(cfg: DictConfig) -> list[str]:
    names = listed(cfg.influence.attributions, "influence.attributions", lambda v, key: one_of(v, METHODS, key))
    require(len(set(names)) == len(names), "influence.attributions", f"lists a method twice: {names}")
    return names


def needs(ranking: str) -> str | None:
    """The score set of ``influence.attributions`` a ranking is made from (None: ``random``,
    and ``ours`` and ``least``, whose scores every influence run computes)."""
    return None if ranking in ("ours", "least", "random") else ranking


def check(cfg: DictConfig, closed_form: bool, labelled: bool) -> None:
    """The attribution settings, before any work."""
    weights(cfg)
    loss_weights(cfg)
    clamp(cfg)
    names = methods(cfg)
    pairs = cfg.influence.loss_pairs
    for key in ("timesteps", "noises"):
        whole(pairs[key], f"influence.loss_pairs.{key}", at_least=1)
    if "feature" in names:
        require(not closed_form and labelled, "influence.attributions",
                "feature needs a labelled image data set (its classifier's features)")
        whole(cfg.influence.feature.epochs, "influence.feature.epochs", at_least=1)
    if "dtrak" in names:
        require(not closed_form, "influence.attributions",
                "dtrak needs a network's parameters; the closed-form model has none")
        dt = cfg.influence.dtrak
        whole(dt.projection_dim, "influence.dtrak.projection_dim", at_least=1)
        require(number(dt.damping, "influence.dtrak.damping") >= 0, "influence.dtrak.damping",
                f"must be >= 0, got {dt.damping}")
        whole(dt.batch_size, "influence.dtrak.batch_size", at_least=1)


def check_rankings(cfg: DictConfig, names: list[str], key: str) -> None:
    """Every ranking in ``names`` has its score set computed (``influence.attributions``)."""
    computed = methods(cfg)
    for i, name in enumerate(names):
        need = needs(name)
        require(need is None or need in computed, f"{key}[{i}]",
                f"ranking {name!r} needs the score set {need!r}: add it to influence.attributions")


# -- the stages of the methods with their own -------------------------------------------------
def stage_depends(cfg: DictConfig, method: str) -> dict[str, Any]:
    """What a method's scores depend on beyond the model and the sample."""
    ic = plain(cfg.influence)
    pairs = {"loss_pairs": ic["loss_pairs"], "seed": int(cfg.seed)}
    if method == "ours_loss":
        used = loss_weights(cfg)
        return pairs | {"weights": used, "clamp": clamp(cfg) if used == "clamped" else None}
    if method == "feature":
        return {"feature": ic["feature"], "seed": int(cfg.seed), "classifier": "cnn"}
    # with the projection's chunking and its sign generator, part of its definition
    return {"dtrak": asdict(dtrak_settings(cfg)), "projection_signs": "keyed_generator"}


def dtrak_settings(cfg: DictConfig):
    """``influence.dtrak`` and ``loss_pairs`` as ``core.trak.DTrakSettings``."""
    from diffsens_cli.core import trak

    dt, pairs = cfg.influence.dtrak, cfg.influence.loss_pairs
    return trak.DTrakSettings(timesteps=int(pairs.timesteps), noises=int(pairs.noises),
                              projection_dim=int(dt.projection_dim), damping=float(dt.damping),
                              batch_size=int(dt.batch_size), seed=int(cfg.seed))


def training_features(cfg: DictConfig, run, source, method: str) -> ArrayDict:
    """Stage: the training images' features [N, k] of ``feature`` (with the classifier's
    weights, ``net/<name>``, to embed the samples) or ``dtrak``, and its seconds."""
    depends = {"source": source.model_key, "method": method, **stage_depends(cfg, method)}

    def compute() -> ArrayDict:
        start = time.perf_counter()
        images = source.points.cpu().numpy()
        if method == "feature":
            from diffsens_cli.pipelines.shared import crossclass

            net, _ = crossclass.fit_cnn(images, source.labels.numpy(), int(cfg.influence.feature.epochs), False,
                                        int(cfg.seed), source.device)
            out = {"features": crossclass.features(net, images),
                   **{f"net/{k}": v.cpu().numpy() for k, v in net.state_dict().items()}}
        else:
            from diffsens_cli.core import trak

            feats = trak.trak_features(source.model, source.points, dtrak_settings(cfg), bool(cfg.solver.progress))
            out = {"features": feats.cpu().numpy()}
        return out | {"wall_time_s": np.array(time.perf_counter() - start)}

    return run.cache.arrays("attribution_features", depends, compute)


def _embed(train: ArrayDict, images: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """``feature``'s embedding of ``images`` by the classifier saved in ``train``."""
    from diffsens_cli.pipelines.shared import crossclass

    net = crossclass.build_cnn(images.shape[1], num_classes, seed)
    net.load_state_dict({k.removeprefix("net/"): torch.from_numpy(v) for k, v in train.items() if k.startswith("net/")})
    return crossclass.features(net.eval(), images)


def method_stage(cfg: DictConfig, run, source, method: str, i: int, sample: np.ndarray,
                 sample_depends: dict[str, Any]) -> ArrayDict:
    """Stage: the scores [N] of ``method`` (one of ``STAGED``) for model sample ``i``
    (``sample`` [*event], from the influence stage with ``sample_depends``), with its
    seconds and the diffusion network's evaluations it took (points times pairs)."""
    depends = {"method": method, "sample": sample_depends, **stage_depends(cfg, method)}
    pairs = cfg.influence.loss_pairs
    evaluations = int(pairs.timesteps) * int(pairs.noises) if method != "feature" else 0

    def compute() -> ArrayDict:
        stored = training_features(cfg, run, source, method) if method != "ours_loss" else {}  # one-off: not timed here
        start = time.perf_counter()
        points = source.points
        x = torch.from_numpy(sample).to(source.device, points.dtype)[None]
        if method == "ours_loss":
            from diffsens_cli.core.trak import output_pairs

            times, noises = output_pairs(int(pairs.timesteps), int(pairs.noises), tuple(x.shape[1:]), int(cfg.seed),
                                         points.dtype, source.device)
            stats = WeightStats()
            clamp_used = clamps(cfg)[loss_weights(cfg)]
            scores = attribution.loss_sensitivity(source.model, points, x, times, noises, clamp_used, stats,
                                                  block=source.block)[0]
            out = {"scores": scores.cpu().numpy(), **{f"weights/{k}": np.array(v) for k, v in stats.as_dict().items()}}
        elif method == "feature":
            classes = len(np.unique(source.labels.numpy()))
            query = torch.from_numpy(_embed(stored, sample[None], classes, int(cfg.seed)))
            train = torch.from_numpy(stored["features"])
            out = {"scores": torch.nn.functional.cosine_similarity(query.double(), train.double(), dim=1).numpy()}
        else:
            from diffsens_cli.core import trak

            train = torch.from_numpy(stored["features"])
            query = trak.trak_features(source.model, x, dtrak_settings(cfg)).cpu()
            lam = trak.relative_damping(train, dtrak_settings(cfg).damping)
            out = {"scores": trak.trak_scores(train, query, lam)[0].numpy()}
        return out | {"wall_time_s": np.array(time.perf_counter() - start),
                      "network_evaluations": np.array(evaluations)}

    return run.cache.arrays("attribution", depends, compute)


# -- score sets, rankings and what they say --------------------------------------------------
def score_sets(cfg: DictConfig, run, source, rows: list[int], per_sample: list[ArrayDict],
               sample_depends: list[dict[str, Any]]) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Every method of ``influence.attributions`` and ``ours``: scores [M, N] for the
    model samples ``rows``; and each method's cost: seconds and diffusion-network
    evaluations per model sample (``ours_*``: the one adjoint pass that gives both
    weights' scores, counted as vectors through the network), and one-off seconds (the
    training images' features)."""
    sets: dict[str, np.ndarray] = {}
    cost: dict[str, dict[str, float]] = {}
    ours_seconds = float(np.mean([a["wall_time_s"] for a in per_sample]))
    ours_vectors = float(np.mean([a["network_vectors"] for a in per_sample]))
    for name in methods(cfg):
        start = time.perf_counter()
        if name in ("ours_clamped", "ours_exact"):
            sets[name] = np.stack([a[f"scores/{name.removeprefix('ours_')}"] for a in per_sample])
        elif name == "ours_set":
            proj = [torch.from_numpy(a[f"projections/{weights(cfg)}"]) for a in per_sample]  # [m, N] each
            sets[name] = np.stack([attribution.rank_scores(attribution.set_order(p.T)).numpy() for p in proj])
        elif name == "l2":
            sets[name] = -np.stack([a["l2"] for a in per_sample])
        if name in sets:
            derived = (time.perf_counter() - start) / len(rows)
            cost[name] = {"seconds_per_sample": (ours_seconds if name.startswith("ours") else 0.0) + derived,
                          "network_evaluations_per_sample": ours_vectors if name.startswith("ours") else 0.0,
                          "one_off_seconds": 0.0}
            continue
        stages = [method_stage(cfg, run, source, name, i, a["sample"], d)
                  for i, a, d in zip(rows, per_sample, sample_depends, strict=True)]
        sets[name] = np.stack([st["scores"] for st in stages])
        one_off = float(training_features(cfg, run, source, name)["wall_time_s"]) if name != "ours_loss" else 0.0
        cost[name] = {"seconds_per_sample": float(np.mean([st["wall_time_s"] for st in stages])),
                      "network_evaluations_per_sample": float(np.mean([st["network_evaluations"] for st in stages])),
                      "one_off_seconds": one_off}
        if name == "ours_loss":  # its weights' counts (clamped, non-finite), never passed over silently
            cost[name]["weights"] = {k.removeprefix("weights/"): int(sum(int(st[k]) for st in stages))
                                     for k in stages[0] if k.startswith("weights/")}
    sets["ours"] = np.stack([a[f"scores/{weights(cfg)}"] for a in per_sample])
    return sets, cost


def clamp_diagnosis(per_sample: list[ArrayDict], points: torch.Tensor) -> dict[str, Any]:
    """What the weight clamp does, per model sample and for each weights: the share of
    weight evaluations clamped low and high, R^2 of the affine fit ``psi^n ~ A x_n + b``,
    the line of |psi^n| on L2 distance (its slope and correlation), and Spearman of |psi^n|
    with distance."""
    l2 = torch.from_numpy(np.stack([a["l2"] for a in per_sample]))
    basis = attribution.principal_basis(points.cpu())
    out: dict[str, Any] = {}
    for c, name in enumerate(WEIGHTS):
        scores = torch.from_numpy(np.stack([a[f"scores/{name}"] for a in per_sample]))
        slope, _, r2 = linear_fit(l2, scores)
        evaluated = np.array([a["weights/evaluated"][c] for a in per_sample], dtype=float)
        low = np.array([a["weights/clamped_low"][c] for a in per_sample]) / evaluated
        high = np.array([a["weights/clamped_high"][c] for a in per_sample]) / evaluated
        affine = [attribution.affine_r2(torch.from_numpy(a[f"projections/{name}"]).T, basis) for a in per_sample]
        rho = spearman_rows(scores.numpy(), l2.numpy())
        corr = torch.sign(slope) * r2.sqrt()
        out[name] = {key: {"per_sample": list(map(float, values)), "median": float(np.median(values))}
                     for key, values in (("share_clamped_low", low), ("share_clamped_high", high),
                                         ("affine_r2", affine), ("slope_l2", slope.numpy()),
                                         ("corr_l2", corr.numpy()), ("spearman_l2", rho))}
    out["affine_components"] = basis.shape[1]
    return out


def comparisons(sets: dict[str, np.ndarray], k: int = 10) -> dict[str, Any]:
    """Per method: the mean over samples of Spearman with each other method, and of the
    share of its top ``k`` that are among the ``k`` nearest images (``l2``)."""
    names = [n for n in sets if n != "ours"]
    m_count = len(next(iter(sets.values())))
    out: dict[str, Any] = {}
    for a in names:
        row: dict[str, Any] = {"spearman": {b: float(np.mean(spearman_rows(sets[a], sets[b])))
                                            for b in names if b != a}}
        if "l2" in sets:
            row[f"top{k}_overlap_l2"] = float(np.mean([attribution.top_k_overlap(
                torch.from_numpy(sets[a][m]), torch.from_numpy(sets["l2"][m]), k) for m in range(m_count)]))
        out[a] = row
    return out


def signed_summary(scores: np.ndarray, k: int = 10) -> dict[str, Any]:
    """For signed scores [M, N] (``ours_loss``): per sample the share of proponents (> 0,
    whose removal would raise the loss) and the top ``k`` proponents and opponents."""
    return {"proponent_share": (scores > 0).mean(1).tolist(),
            f"top{k}_proponents": np.argsort(-scores, axis=1, kind="stable")[:, :k].tolist(),
            f"top{k}_opponents": np.argsort(scores, axis=1, kind="stable")[:, :k].tolist()}


def ranking_orders(columns: list[tuple[str, int]], sets: dict[str, np.ndarray], m: int, n: int,
                   seed: int) -> list[torch.Tensor]:
    """The order of the N training images, most influential first, of each removal column
    ``(ranking, replicate)`` for model sample m: ``random`` is one seeded permutation per
    replicate (the same for every sample), the others are the sample's scores sorted."""
    from diffsens_cli.core.keyed_random import keyed_generator

    orders = []
    for name, replicate in columns:
        if name == "random":  # replicate 0 keeps the key of the single random order of earlier runs
            key = ("ranking", seed) if replicate == 0 else ("ranking", seed, replicate)
            orders.append(torch.randperm(n, generator=keyed_generator(*key)))
        elif name == "least":
            orders.append(torch.argsort(torch.from_numpy(sets["ours"][m])))
        else:
            orders.append(torch.argsort(torch.from_numpy(sets[name][m]), descending=True))
    return orders
