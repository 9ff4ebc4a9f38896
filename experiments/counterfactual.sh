#!/usr/bin/env bash
# Do the influence scores hold up when the data really change? Counterfactual retraining
# without each ranking's top-k training images, and a linear datamodeling score over
# random halves, on the embedded digits (36 trainings, about 50 minutes on 2 CPU cores).
set -euo pipefail
diffsens run experiment=digits_counterfactual "$@"
# The full size (68 trainings; the 36 above are reused):
#   diffsens run experiment=digits_counterfactual influence.samples=8 datamodel.subsets=16
