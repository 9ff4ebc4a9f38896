"""Command line: ``diffsens run [experiment=NAME] [KEY=VALUE ...]`` (a Hydra app).

Before Hydra starts a run, the overrides are composed and every value checked (for a
sweep, ``-m``, every job of it), so a typo or a bad value ends with one line naming the
key and what is allowed, exit status 2, and no run directory.  Ctrl-C ends with one
line naming what stopped, exit status 130; the same command resumes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import warnings
from pathlib import Path

import hydra
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from diffsens_cli import interrupt, sweeps, threads
from diffsens_cli.errors import DiffsensError
from diffsens_cli.sweeps import CONFIG_MODULE

USAGE = """\
usage: diffsens run [experiment=NAME] [GROUP=OPTION] [KEY=VALUE ...] [HYDRA FLAGS]
       diffsens train [dataset=NAME] [model=NAME] [train.mode=base|retrain|finetune] [KEY=VALUE ...]
       diffsens report [DIR ...] [--out DIR]

Runs one experiment into outputs/NAME/DATE_TIME (hydra.run.dir=PATH to choose). Finished
stages are kept in outputs/stages and reused: run the same command again to resume an
interrupted run; stages.force=[NAME] recomputes a stage.
  diffsens run experiment=digits_typography    paper Figs. 5-7 on embedded digits (the default)
  diffsens run experiment=celeba_oldman dataset.root=DIR   Figs. 5-7 on CelebA (also: mnist_tmnist)
  diffsens run experiment=celeba_attributes    paper App. E, Figs. 15-16 (embedded faces)
  diffsens run experiment=gmm_first_order      paper Fig. 3
  diffsens run experiment=toy2d                paper Figs. 1-2
  diffsens run experiment=gmm_score_error      paper Fig. 4 (CPU-sized; _paper: App. F.1.2)
  diffsens run experiment=bench_engine         engine cost benchmark
  diffsens train dataset=digits model=unet     train a score network (experiment=train)
  diffsens run --help                          config groups and Hydra flags
  diffsens run experiment=toy2d --cfg job      print the composed config
  diffsens run -m solver.step_size=1e-3,5e-3   a sweep (multirun)
  diffsens report                              one page, report/index.html, of the newest run of each
                                               experiment under outputs/ (figures embedded)
"""


# The site folder on Hydra's search path (config.yaml) is optional: most users have none.
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=.* is not available")


def fail(message: str) -> None:
    print(f"diffsens: error: {message}", file=sys.stderr)
    sys.exit(2)


MULTIRUN_FLAGS = ("-m", "--multirun")
# Where a command was started: relative paths (stages.dir) mean the same in all its jobs.
LAUNCH_DIR = "DIFFSENS_LAUNCH_DIR"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in ("run", "train", "report"):
        fail(f"unknown command {command!r}; the commands are: run, train, report")
    if command == "report":
        import argparse

        from diffsens_cli.report import write_report

        parser = argparse.ArgumentParser(prog="diffsens report",
                                         description="One HTML page of the newest run of each experiment.")
        parser.add_argument("dirs", nargs="*", type=Path, default=[Path("outputs")], metavar="DIR",
                            help="folders searched for run directories (default: outputs)")
        parser.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                            help="folder of the page, index.html (default: report)")
        args = parser.parse_args(rest)
        try:
            print(write_report(args.dirs, args.out))
        except DiffsensError as e:
            fail(str(e))
        return
    if command == "train" and not any(a.startswith("experiment=") for a in rest):
        rest = ["experiment=train", *rest]
    multirun = any(a in MULTIRUN_FLAGS for a in rest)
    overrides = [a for a in rest if a not in MULTIRUN_FLAGS]
    interrupt.install()
    os.environ[LAUNCH_DIR] = os.getcwd()  # its jobs inherit it, on other machines too (submitit)
    try:
        if not any(a.startswith("-") for a in overrides):  # --help, --cfg ...: Hydra's own
            try:
                check_jobs(overrides, multirun)
            except DiffsensError as e:
                fail(str(e))
        sys.argv = ["diffsens run", *(["-m"] if multirun else []), *overrides]
        _hydra_app()
    except KeyboardInterrupt:
        what = interrupt.stopped()
        sig = interrupt.requested() or signal.SIGINT
        how = "interrupted" if sig == signal.SIGINT else f"terminated ({sig.name})"
        print(f"diffsens: {how}{f' during {what}' if what else ''}; run the same command again to resume "
              "(finished stages and training checkpoints are kept)", file=sys.stderr)
        sys.exit(128 + sig)


def check_jobs(overrides: list[str], multirun: bool) -> None:
    """Check the job ``overrides`` describe, or with ``multirun`` every job of the sweep,
    before any is launched; raises a DiffsensError naming the key (and the job)."""
    parsed = sweeps.parse(overrides)
    if any(o.key_or_group == "hydra/launcher" and o.value() == "slurm" for o in parsed):
        check_site_settings(site_file("slurm"))
    swept_overrides = [o for o in parsed if o.is_sweep_override()]
    if not multirun:
        if swept_overrides:
            key = swept_overrides[0].key_or_group
            raise DiffsensError(f"{swept_overrides[0].input_line}: several values sweep {key}, which needs -m "
                                f"(diffsens run -m ...); a list value is written {key}=[a,b]")
        precheck(overrides)
        return
    jobs = sweeps.split_jobs(parsed)
    swept = {o.get_key_element() for o in swept_overrides}
    for number, job in enumerate(jobs):
        try:
            precheck(job, run_dir=False)  # a sweep's jobs write into fresh folders
        except DiffsensError as e:
            values = " ".join(o for o in job if o.split("=", 1)[0] in swept)
            raise DiffsensError(f"{e} (sweep job #{number} of {len(jobs)}: {values}; no job was launched)") from None


def site_file(name: str) -> Path:
    """``site/<name>.yaml`` in the site folder on config.yaml's search path:
    ``$DIFFSENS_CONFIG_DIR``, else ``~/.config/diffsens``."""
    root = os.environ.get("DIFFSENS_CONFIG_DIR") or f"{os.environ.get('HOME', '/nonexistent')}/.config/diffsens"
    return Path(root) / "site" / f"{name}.yaml"


def check_site_settings(path: Path) -> None:
    """The Slurm site file, if there is one: YAML text, a mapping, keys the launcher takes
    (Hydra would stop on each with a long traceback that names neither key nor file)."""
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    if not path.is_file():
        return
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise DiffsensError(f"{path}: not a text file (the Slurm site settings are YAML)") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise DiffsensError(f"{path}: not valid YAML: {' '.join(str(e).split()) or 'nested too deep'}") from None
    except OSError as e:
        raise DiffsensError(f"{path}: unreadable ({e.strerror or e})") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise DiffsensError(f"{path}: must be a mapping of Slurm launcher settings (partition: gpu, ...), "
                            f"got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(SlurmQueueConf) if not f.name.startswith("_")]
    unknown = [str(k) for k in data if k not in known]
    if unknown:
        raise DiffsensError(f"{path}: unknown key {unknown[0]!r}; the Slurm launcher takes: {', '.join(known)}")


def precheck(overrides: list[str], run_dir: bool = True) -> None:
    """Compose ``overrides`` (one job) and build every component, and with ``run_dir``
    check what its run directory already holds; raises a DiffsensError."""
    from diffsens_cli.pipelines import check_task

    parsed = sweeps.parse(overrides)
    groups = sweeps.config_groups()
    is_choice = [o.key_or_group.lstrip("/").split("/")[0] in groups for o in parsed]
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            base = compose("config", overrides=[o.input_line for o, c in zip(parsed, is_choice) if c])
        except MissingConfigException as e:
            group = (e.missing_cfg_file or "").split("/")[0]
            chosen = next((o.value() for o in parsed if o.key_or_group.lstrip("/") == group), None)
            raise DiffsensError(f"{group}={chosen}: no such {group}; choose from: {', '.join(e.options or [])}") \
                from None
        except HydraException as e:
            raise DiffsensError(str(e).splitlines()[0]) from None
        for o, choice in zip(parsed, is_choice):
            key = o.key_or_group
            if choice or o.is_add() or o.is_delete() or key.startswith("hydra"):
                continue
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            # select answers the default for a present but mandatory ??? value too, and
            # `in` says False for it: keys() lists it
            if OmegaConf.select(base, key, default=_MISSING) is _MISSING and not (
                    isinstance(node, DictConfig) and leaf in list(node.keys())):
                known = ", ".join(node.keys()) if isinstance(node, DictConfig) else "(none)"
                raise DiffsensError(f"{key}: no such key; {parent or 'the top level'} has: {known}")
        try:
            cfg = compose("config", overrides=overrides, return_hydra_config=run_dir)
        except HydraException as e:
            raise DiffsensError(str(e).splitlines()[0]) from None
        directory = None
        if run_dir:  # what a single run will write into, without the hydra node the run never sees
            directory = OmegaConf.select(cfg, "hydra.run.dir")
            with open_dict(cfg):
                del cfg["hydra"]
    GlobalHydra.instance().clear()
    check_task(cfg, directory)


_MISSING = object()


@hydra.main(version_base="1.3", config_path="pkg://" + CONFIG_MODULE, config_name="config")
def _hydra_app(cfg: DictConfig) -> None:
    from diffsens_cli.pipelines import run_task

    hydra_cfg = HydraConfig.get()
    out_dir = hydra_cfg.runtime.output_dir
    launched_from = os.environ.get(LAUNCH_DIR, hydra_cfg.runtime.cwd)
    with interrupt.handlers():  # a job that submitit started never ran main()
        try:
            threads.configure(OmegaConf.select(hydra_cfg, "launcher.cpus_per_task"))
            with open_dict(cfg):  # jobs with another working directory share the cache
                cfg.stages.dir = os.path.abspath(Path(launched_from, Path(str(cfg.stages.dir)).expanduser()))
            with interrupt.doing(f"the run into {out_dir}"):
                run_task(cfg, out_dir)
        except DiffsensError as e:
            fail(str(e))
        except KeyboardInterrupt:
            interrupt.hand_over()  # in a submitit job, after its preemption signal: requeue the job
            raise


if __name__ == "__main__":
    main()
