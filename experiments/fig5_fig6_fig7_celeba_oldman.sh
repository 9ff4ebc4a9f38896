#!/usr/bin/env bash
# Paper Figs. 5-7, CelebA "old man" at App. F.2's settings (a GPU job). Usage:
#   experiments/fig5_fig6_fig7_celeba_oldman.sh dataset.root=/data/celeba [perturbation.scores_file=clip.npy perturbation.top_k=495]
set -euo pipefail
diffsens run experiment=celeba_oldman "$@"
