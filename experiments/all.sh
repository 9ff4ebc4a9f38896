#!/usr/bin/env bash
# Regenerate every figure this version of diffsens makes from embedded data, each into
# outputs/<experiment>/. The paper-sized image experiments need local data sets: see
# fig5_fig6_fig7_mnist_tmnist.sh and fig5_fig6_fig7_celeba_oldman.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for recipe in fig1_fig2_toy2d fig3_first_order fig4_score_error fig5_fig6_fig7_digits_typography \
    fig15_fig16_celeba_attributes table3_fisher_ot psi_convergence fig8_to_fig14_influence fig11_crossclass \
    counterfactual; do
  echo "== $recipe"
  bash "$here/$recipe.sh" "$@"
done
