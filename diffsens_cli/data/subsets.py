"""Perturbation sets S: the images whose empirical measure nu is added to or removed from
rho's training data, selected from rho's own data set or from another one.

Filters apply in turn to the images left by the previous one: ``classes`` (labels),
``attributes`` (a boolean expression over the set's attributes: CelebA's 40, or the
pixel-statistic stand-ins of the embedded faces), ``top_k`` highest of
``scores_file``, then a seeded random draw of ``num_samples``.
"""

from __future__ import annotations

import ast
import re
from functools import reduce
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from diffsens_cli.data.base import ImageSet, Spec, at_side, draw
from diffsens_cli.data.load import Memo, check_images, load_images
from diffsens_cli.errors import ConfigError, one_of, require


def attribute_mask(expression: str, attributes: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The bool mask of ``expression``: attribute names joined by and, or, not and parentheses.

    Parsed with ``ast`` and evaluated node by node, so nothing else can run. Names that are
    not Python identifiers (CelebA's ``5_o_Clock_Shadow``) are aliased before parsing."""
    aliases: dict[str, str] = {}
    text = expression
    for i, name in enumerate(sorted(attributes, key=len, reverse=True)):
        if not name.isidentifier():
            aliases[f"_attribute_{i}_"] = name
            text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", f"_attribute_{i}_", text)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(key, f"cannot parse {expression!r}: write attribute names joined by and, or, not "
                               "and parentheses") from None

    def evaluate(node: ast.AST) -> torch.Tensor:
        if isinstance(node, ast.BoolOp):
            combine = torch.logical_and if isinstance(node.op, ast.And) else torch.logical_or
            return reduce(combine, map(evaluate, node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~evaluate(node.operand)
        if isinstance(node, ast.Name):
            name = aliases.get(node.id, node.id)
            require(name in attributes, key, f"unknown attribute {name!r} in {expression!r}; the attributes are "
                    f"{', '.join(attributes)}")
            return attributes[name]
        raise ConfigError(key, f"{expression!r} uses {ast.unparse(node)!r}; only attribute names, and, or, not and "
                               "parentheses are allowed")

    return evaluate(tree.body)


def read_scores(path_value: str, count: int, key: str) -> torch.Tensor:
    """``count`` finite scores from a .npy file or a text/CSV file with one per line."""
    path = Path(str(path_value)).expanduser()
    require(path.is_file(), key, f"no such file: {path} (expected {count} scores, one per image of the source set)")
    try:
        scores = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, delimiter=",",
                                                                                            ndmin=1)
    except ValueError as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None
    scores = np.asarray(scores, dtype=np.float64)
    require(scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1), key,
            f"{path} holds an array of shape {scores.shape}; expected one score per line")
    scores = scores.reshape(-1)
    require(len(scores) == count, key, f"{path} holds {len(scores)} scores, but the source set has {count} images "
            "(one score per image, in order, after split and limit)")
    require(bool(np.isfinite(scores).all()), key, f"{path} holds non-finite scores")
    return torch.from_numpy(scores)


def _other_source(p: Spec, base_cfg: DictConfig | dict, base_side: int) -> dict | None:
    """The ``source`` config S is selected from, with rho's image side unless it sets its own;
    None when S comes from rho's own data set (``source`` null or the same config)."""
    source = p.get("source")
    if source is None or source == Spec(base_cfg, "dataset").values:
        return None
    require(isinstance(source, dict), p.name("source"), f"must be null or a dataset config, got {source!r}")
    require(p.choice("direction", ["add", "remove"], "add") == "add", p.name("source"),
            "direction=remove takes S from rho's own data set: leave source null and select with classes, "
            "attributes, scores_file/top_k or num_samples")
    return at_side(source, base_side)


def _same_shape(p: Spec, name: str, shape: tuple[int, ...], base_name: str, base_shape: tuple[int, ...]) -> None:
    require(tuple(shape) == tuple(base_shape), p.name("source"),
            f"{name} images are {'x'.join(map(str, shape))}, but rho's data set {base_name} has "
            f"{'x'.join(map(str, base_shape))} (channels x height x width)")


def _source(p: Spec, base: ImageSet, base_cfg: DictConfig | dict, cache: Memo | None) -> ImageSet:
    """The set S is selected from: rho's own data set, or ``source`` loaded (through ``cache``)."""
    source = _other_source(p, base_cfg, base.images.shape[-1])
    if source is None:
        return base
    loaded = load_images(source, key=p.name("source"), cache=cache)
    _same_shape(p, loaded.name, loaded.images.shape[1:], base.name, base.images.shape[1:])
    return loaded


def _classes(p: Spec) -> list[int] | None:
    classes = p.get("classes")
    if classes is None:
        return None
    classes = [classes] if isinstance(classes, int) and not isinstance(classes, bool) else classes
    require(isinstance(classes, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in classes),
            p.name("classes"), f"must be null or a list of integer labels, got {p.get('classes')!r}")
    return classes


def _expression(p: Spec) -> str | None:
    expression = p.get("attributes")
    require(expression is None or isinstance(expression, str), p.name("attributes"),
            f"must be null or a boolean expression over attribute names, got {expression!r}")
    return expression


def _top_k(p: Spec) -> int | None:
    top_k = p.positive_int("top_k")
    require((top_k is None) == (p.get("scores_file") is None), p.name("top_k"),
            "scores_file and top_k go together: keep the top_k highest scores")
    return top_k


def check_perturbation_set(pcfg: DictConfig | dict, base_cfg: DictConfig | dict,
                           base_shape: tuple[int, int, int]) -> None:
    """Check an image_set ``perturbation`` node without loading images: its values, its source
    data set (files and image shape against rho's ``base_shape``) and that its scores file exists."""
    p = Spec(pcfg, "perturbation")
    one_of(p.get("kind"), ["image_set"], p.name("kind"))
    p.choice("direction", ["add", "remove"], "add")
    source = _other_source(p, base_cfg, base_shape[-1])
    if source is not None:
        _same_shape(p, str(source.get("kind")), check_images(source, key=p.name("source")),
                    str(Spec(base_cfg, "dataset").get("kind")), base_shape)
    _classes(p)
    _expression(p)
    if _top_k(p) is not None:
        path = Path(str(p.get("scores_file"))).expanduser()
        require(path.is_file(), p.name("scores_file"), f"no such file: {path} (expected one score per image of the "
                "source set)")
    p.positive_int("num_samples")
    p.seed()


def perturbation_set(pcfg: DictConfig | dict, base: ImageSet, base_cfg: DictConfig | dict,
                     cache: Memo | None = None) -> ImageSet:
    """The images of S from the ``perturbation`` node of kind image_set; ``base`` is rho's loaded
    data set and ``base_cfg`` its ``dataset`` node; ``cache`` as ``load_images``'. A selection
    of no images is a ConfigError."""
    p = Spec(pcfg, "perturbation")
    one_of(p.get("kind"), ["image_set"], p.name("kind"))
    src = _source(p, base, base_cfg, cache)
    keep = torch.arange(len(src))
    applied: list[str] = []

    def narrow(mask: torch.Tensor, field: str) -> torch.Tensor:
        """``keep`` where ``mask``; an error naming ``field`` (and the filters before it) if none is left."""
        where = f"left after {', '.join(applied)} (of {len(src)} in {src.name})" if applied else f"of {src.name}"
        require(bool(mask.any()), p.name(field), f"{p.get(field)!r} selects none of the {len(keep)} images {where}")
        applied.append(f"{p.name(field)}={p.get(field)!r}")
        return keep[mask]

    classes = _classes(p)
    if classes is not None:
        require(src.labels is not None, p.name("classes"), f"the source set {src.name} has no class labels")
        keep = narrow(torch.isin(src.labels[keep], torch.tensor(classes, dtype=torch.int64)), "classes")

    expression = _expression(p)
    if expression is not None:
        require(src.attributes is not None, p.name("attributes"),
                f"the source set {src.name} has no attributes (celeba and lfw_faces have them)")
        keep = narrow(attribute_mask(expression, src.attributes, p.name("attributes"))[keep], "attributes")

    top_k = _top_k(p)
    if top_k is not None:
        scores = read_scores(p.get("scores_file"), len(src), p.name("scores_file"))
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)[:top_k]].sort().values

    chosen = draw(len(keep), p.positive_int("num_samples"), p.seed())
    if chosen is not None:
        keep = keep[chosen]
    subset = src.subset(keep)
    subset.name = f"S({src.name})"
    return subset
