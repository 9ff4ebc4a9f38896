#!/usr/bin/env bash
# Paper App. E (Figs. 15-16): sensitivities of a few samples to attribute sets, and the
# segments x + a psi. Embedded faces by default; on CelebA (reusing celeba_oldman's base
# model): experiment=celeba_attributes_paper dataset.root=/data/celeba
set -euo pipefail
diffsens run experiment=celeba_attributes "$@"
