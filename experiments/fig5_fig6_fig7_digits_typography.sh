#!/usr/bin/env bash
# Paper Sec. 4.3 (Figs. 5-7) on the embedded digits: sensitivities against the OT baseline
# as predictors of the change after retraining and fine-tuning (about 3 min on 2 CPU cores;
# solver=paper_images: the paper's solver setting, about 6 min).
# Makes fig5_retrain_correlations, fig6_finetune_correlations, fig7_{retrain,finetune}_changes.
set -euo pipefail
diffsens run experiment=digits_typography "$@"
