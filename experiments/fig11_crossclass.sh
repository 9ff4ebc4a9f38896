#!/usr/bin/env bash
# Paper Fig. 11: mean influence of each class's training images on each class's model
# samples, on the embedded digits (digits_typography's base model).
set -euo pipefail
diffsens run experiment=digits_crossclass "$@"
# On CIFAR-10 (a GPU job, a pretrained model you bring):
#   diffsens run experiment=cifar10_crossclass dataset.root=DIR model.path=DIR
