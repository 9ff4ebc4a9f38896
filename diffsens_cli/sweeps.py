"""Command-line overrides and sweeps: the one module that uses Hydra's internals.

``parse`` reads override strings as Hydra does; ``split_jobs`` expands the swept ones
(``a=1,2``, ``range(...)``, ``glob(...)`` over a config group's options) into one list
of overrides per job, in the order Hydra's basic sweeper launches them. The CLI checks
every job of a sweep with it before any is launched, and the shard assembly
(``sharding.py``) finds the jobs to assemble with it. Hydra's own errors become one
``DiffsensError`` line.
"""

from __future__ import annotations

from importlib.resources import files

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from diffsens_cli.errors import DiffsensError

CONFIG_MODULE = "diffsens_cli.configs"


def parse(overrides: list[str]) -> list[Override]:
    """``overrides`` parsed as Hydra parses the command line."""
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise DiffsensError(str(e).splitlines()[0]) from None


def split_jobs(parsed: list[Override]) -> list[list[str]]:
    """The jobs of a sweep: one list of overrides per combination of the swept values."""
    for override in parsed:  # glob(...) sweeps over a group's options ask a config loader for them
        if override.is_sweep_override():
            override.config_loader = GroupOptions()
    try:
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as e:
        raise DiffsensError(" ".join(str(e).split())) from None


def config_groups() -> set[str]:
    """The names of the package's config groups (``dataset``, ``solver``, ...)."""
    return {p.name for p in files(CONFIG_MODULE).iterdir() if p.is_dir() and not p.name.startswith("_")}


class GroupOptions:
    """As much of Hydra's ConfigLoader as a ``glob()`` sweep needs: a config group's options."""

    def get_group_options(self, group: str, results_filter: object = None) -> list[str]:
        folder = files(CONFIG_MODULE) / group.lstrip("/")
        if not folder.is_dir():
            raise DiffsensError(f"{group}=glob(...): {group} is not a config group")
        return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))
