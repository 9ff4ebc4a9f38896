#!/usr/bin/env bash
# Paper Fig. 3 (App. F.1.1): Taylor remainders for ODE/SDE step sizes and Hutchinson probes.
# Makes fig3_remainders.{png,pdf}.
set -euo pipefail
diffsens run experiment=gmm_first_order "$@"
