#!/usr/bin/env bash
# Every paper figure this version of diffsens makes, as one sweep (one job per experiment;
# on a cluster add hydra/launcher=slurm and they run in parallel), then one page of them
# all: report/index.html (`diffsens report`), beside each run's own index.html.
#   experiments/all.sh [--paper] [OVERRIDES ...]      (make figures ARGS="...")
# The default list runs on the embedded data sets, sized for a CPU. --paper runs the
# paper-sized experiments on local data sets, read from data/celeba, data/mnist and
# data/tmnist under the working directory (GPU jobs; see each experiment's config).
set -euo pipefail
experiments=toy2d,gmm_first_order,gmm_score_error,digits_typography,celeba_attributes,fisher_ot_check
experiments+=,digits_psi_convergence,digits_influence,lfw_influence,digits_crossclass,digits_counterfactual
kind=cpu
if [[ "${1:-}" == "--paper" ]]; then
  shift
  kind=paper
  experiments=celeba_oldman,mnist_tmnist,celeba_attributes_paper,gmm_score_error_paper,celeba_influence
  experiments+=,mnist_counterfactual
fi
sweep="outputs/figures/$kind/$(date +%Y-%m-%d_%H-%M-%S)"
diffsens run -m "experiment=$experiments" "hydra.sweep.dir=$sweep" 'hydra.sweep.subdir=${name}' "$@"
diffsens report "$sweep" --out report
