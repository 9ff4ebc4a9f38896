#!/usr/bin/env bash
# Paper Figs. 1-2: score sensitivity field g_t and sample sensitivities on a 2-D curve.
# Makes fig1_score_sensitivity.{png,pdf} and fig2_sample_sensitivity.{png,pdf} (about 1 min on 2 CPU cores).
set -euo pipefail
diffsens run experiment=toy2d "$@"
