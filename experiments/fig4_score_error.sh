#!/usr/bin/env bash
# Paper Fig. 4 (Sec. 4.2, App. F.1.2): median correlation of a learned model's sample
# sensitivities with the exact ones, against the training loss. CPU-sized (a few
# minutes); experiment=gmm_score_error_paper runs App. F.1.2's settings on a GPU.
# Makes fig4_score_error.{png,pdf}.
set -euo pipefail
diffsens run experiment=gmm_score_error "$@"
