#!/usr/bin/env bash
# Which attribution holds up when the data really change? On 300 of the embedded digits:
# the LDS of every score set over 32 random halves for 32 model samples (the loss and the
# move of each), removal of each method's top 2% and 10% for the first 8, random removals
# with three seeds and three noise-floor seeds (147 trainings; docs/attribution.md: "Do the
# scores hold up when the data change?"; 87 minutes measured on 2 CPU cores).
set -euo pipefail
diffsens run experiment=digits_counterfactual "$@"
# The same protocol at N = 1797 with the base preset's training, 64 halves, 64 queries and
# removals for 16 of them (298 trainings of about 90 s on 2 cores: a cluster job), the
# retrainings split over the jobs; the sweep's end assembles the figures (so does the
# unsharded command, rerun):
#   N1797="dataset.limit=null train.epochs=40 train.batch_size=128 influence.samples=64 datamodel.subsets=64 counterfactual.queries=16"
#   diffsens run -m experiment=digits_counterfactual $N1797 hydra/launcher=slurm shard.count=64 'shard.index=range(0,64)'
#   diffsens run experiment=digits_counterfactual $N1797
# The LDS alone at N = 1797 (32 queries x 32 halves, 36 trainings, about 1 h 25 min on 2 cores):
#   diffsens run experiment=digits_counterfactual dataset.limit=null train.epochs=40 train.batch_size=128 \
#     datamodel.subsets=32 'counterfactual.rankings=[random]' counterfactual.random_seeds=1
