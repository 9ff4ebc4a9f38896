#!/usr/bin/env bash
# Paper Sec. 4.4 (Figs. 8-10, 12-14): influence of every training image on a few model
# samples (scores, their regression on L2 distance, singular directions), on the embedded
# digits (digits_typography's base model) and faces (celeba_attributes' base model).
set -euo pipefail
diffsens run experiment=digits_influence "$@"
diffsens run experiment=lfw_influence "$@"
# On CelebA (a GPU job): diffsens run experiment=celeba_influence dataset.root=DIR
