#!/usr/bin/env bash
# How accurate is psi? Solver settings against a converged reference on the embedded
# digits (docs/accuracy.md: "How accurate is psi?"; solver=accurate and solver=fast come
# from it).
set -euo pipefail
diffsens run experiment=digits_psi_convergence "$@"
