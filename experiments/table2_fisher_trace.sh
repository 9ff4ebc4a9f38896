#!/usr/bin/env bash
# Related paper (diffusion Fisher), Table 2: the relative error of the diffusion Fisher's trace,
# learned (DF-TM) against the autodiff trace of a learned score, on the 2-D chessboard whose
# exact trace is known; and the CCoV log-density with such a trace against one Hutchinson probe.
# Makes table2_fisher_trace.{png,pdf} and the table in summary.json (about 105 s on 2 CPU cores).
set -euo pipefail
diffsens run experiment=fisher_trace_chessboard "$@"
