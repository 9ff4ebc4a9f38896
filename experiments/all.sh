#!/usr/bin/env bash
# Regenerate every figure this version of diffsens makes, each into outputs/<experiment>/.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for recipe in fig1_fig2_toy2d fig3_first_order fig4_score_error; do
  echo "== $recipe"
  bash "$here/$recipe.sh" "$@"
done
