#!/usr/bin/env bash
# Do the influence scores hold up when the data really change? Counterfactual retraining
# without each ranking's top-k training images, and a linear datamodeling score over
# random halves, on the embedded digits (42 trainings, about an hour on 2 CPU cores).
set -euo pipefail
diffsens run experiment=digits_counterfactual "$@"
# 8 samples and 16 subsets (74 trainings; the 42 above are reused):
#   diffsens run experiment=digits_counterfactual influence.samples=8 datamodel.subsets=16
# The LDS of every score set over 32 queries and 32 random halves (README: "The LDS at the
# field's size"; 36 trainings, about 1 h 25 min):
#   diffsens run experiment=digits_counterfactual "influence.samples=$(python3 -c 'print(list(range(32)))')" \
#     datamodel.subsets=32 'counterfactual.rankings=[random]' counterfactual.random_seeds=1
