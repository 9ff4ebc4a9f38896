#!/usr/bin/env bash
# Related paper (diffusion Fisher), Sec. 6 / Table 3: is the PF-ODE map optimal transport?
# Asymmetry of the flow-map Jacobian for VE, VP, sub-VP and EDM on three 2-D data sets.
# Makes table3_fisher_ot.{png,pdf} and the table in summary.json (about 75 s on 2 CPU cores).
set -euo pipefail
diffsens run experiment=fisher_ot_check "$@"
