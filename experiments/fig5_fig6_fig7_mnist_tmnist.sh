#!/usr/bin/env bash
# Paper Figs. 5-7, MNIST + TMNIST at App. F.2's settings (a GPU job). Usage:
#   experiments/fig5_fig6_fig7_mnist_tmnist.sh dataset.root=/data/mnist perturbation.source.root=/data/tmnist
set -euo pipefail
diffsens run experiment=mnist_tmnist "$@"
