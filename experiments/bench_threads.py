"""Two jobs on one node: torch's default threads against the CPUs each job was given.

torch starts one thread per visible core, so two jobs sharing a node run twice as many
threads as it has cores.  diffsens gives each job the CPUs Slurm (SLURM_CPUS_PER_TASK),
the launcher (hydra.launcher.cpus_per_task) or OMP_NUM_THREADS gave it
(diffsens_cli/threads.py).  This times one sensitivity step of the digits UNet (a score
evaluation with 2 JVP tangents, batch 64) in worker processes, side by side: one job
alone, two at once with the default, and two at once with the cores split between them.

    .venv/bin/python experiments/bench_threads.py [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(steps: int) -> None:
    """Time ``steps`` sensitivity steps; print the median seconds per step as JSON."""
    from importlib.resources import files

    import torch
    from omegaconf import OmegaConf

    from diffsens_cli import threads
    from diffsens_cli.builders import build_schedule
    from diffsens_cli.models.unet import build_network_model

    configured = threads.configure()
    configs = files("diffsens_cli.configs")
    schedule = build_schedule(OmegaConf.load(str(configs / "schedule" / "vp_discrete.yaml")))
    model_cfg = OmegaConf.load(str(configs / "model" / "unet.yaml"))
    model_cfg.seed = 0
    model = build_network_model(model_cfg, (1, 8, 8), schedule)
    gen = torch.Generator().manual_seed(0)
    z, v = torch.randn(64, 1, 8, 8, generator=gen), torch.randn(2, 64, 1, 8, 8, generator=gen)
    t = torch.tensor(0.5)
    times = []
    with torch.no_grad():
        model.score_and_jvp(z, t, v)  # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            model.score_and_jvp(z, t, v)
            times.append(time.perf_counter() - start)
    print(json.dumps({"s_per_step": statistics.median(times), **configured}))


def jobs(count: int, env: dict[str, str], steps: int) -> list[dict]:
    """Start ``count`` workers at once with ``env`` added (and no other thread setting); their results."""
    base = {k: v for k, v in os.environ.items() if k not in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--steps", str(steps)],
                              env={**base, **env}, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    from diffsens_cli.threads import visible_cpus

    cores = visible_cpus()
    share = str(max(1, cores // 2))
    cases = {
        "one job, default threads": jobs(1, {}, args.steps),
        "two jobs, default threads": jobs(2, {}, args.steps),
        f"two jobs, SLURM_CPUS_PER_TASK={share} each": jobs(2, {"SLURM_CPUS_PER_TASK": share}, args.steps),
    }
    alone = cases["one job, default threads"][0]["s_per_step"]
    print(f"bench_threads: digits UNet, one sensitivity step (batch 64, 2 tangents), {cores} visible cores")
    for name, results in cases.items():
        per_step = [r["s_per_step"] for r in results]
        slowest = max(per_step)
        print(f"  {name:<40} threads {results[0]['threads']:>2}  s/step "
              f"{', '.join(f'{s:.3f}' for s in per_step):<14}  slowest / alone {slowest / alone:6.2f}x")


if __name__ == "__main__":
    main()
