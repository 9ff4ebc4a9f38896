#!/usr/bin/env bash
# Related paper "Generalization through variance", Figs. 1-2: the proxy score's noise share
# over the plane (about 12 s on 2 CPU cores) and the naive sampler against a kernel density
# estimate, with its scaling in R and in the number of steps (about 65 s), then the
# naive sampler's variance predicted by the adjoint and six learned models (about 5 minutes).
# See docs/generalization.md for the settings the paper leaves open.
set -euo pipefail
diffsens run experiment=gtv_proxy_variance "$@"
diffsens run experiment=gtv_naive_sampler "$@"
diffsens run experiment=gtv_variance_prediction "$@"
