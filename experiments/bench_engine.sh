#!/usr/bin/env bash
# Cost of sensitivities against sampling and sampling + likelihood (summary.json ratios).
# On a GPU: experiments/bench_engine.sh solver.device=cuda bench.batch_size=4096
set -euo pipefail
diffsens run experiment=bench_engine "$@"
