#!/usr/bin/env bash
# Every paper figure this version of diffsens makes, as one sweep (one job per experiment;
# on a cluster add hydra/launcher=slurm and they run in parallel), then one page of them
# all: report/index.html (`diffsens report`), beside each run's own index.html.
#   experiments/all.sh [--paper] [--resume SWEEP_DIR] [OVERRIDES ...]   (make figures ARGS="...")
# The default list runs on the embedded data sets, sized for a CPU. --paper runs the
# paper-sized experiments on local data sets, read from data/celeba, data/mnist and
# data/tmnist under the working directory (GPU jobs; see each experiment's config).
# --resume SWEEP_DIR finishes an interrupted sweep: the experiments that wrote their
# summary.json there are kept, the others run again into it (reusing their cached stages);
# give it the overrides the sweep was started with, since the kept runs are not checked.
# Each experiment says which list it is on by a line `# suite: cpu`, `# suite: paper` or
# `# suite: none` (benchmarks, closed-form checks) in its config: a new one joins by its own file.
set -euo pipefail
configs="$(dirname "$0")/../configs/experiment"
suite() {  # the experiments of suite $1, comma-separated, in name order
  grep -lx "# suite: $1" "$configs"/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | paste -sd, -
}
experiments=$(suite cpu)
kind=cpu
sweep=""
overrides=()  # everything else goes to `diffsens run` (key=value overrides, Hydra's own flags)
while (( $# )); do
  case "$1" in
    --paper)
      kind=paper
      experiments=$(suite paper)
      ;;
    --resume)
      sweep="${2:-}"
      if [[ -z "$sweep" || ! -d "$sweep" ]]; then
        echo "experiments/all.sh: --resume: '$sweep' is not a folder (give the sweep folder of the interrupted run)" >&2
        exit 2
      elif [[ "$sweep" == *\\* ]]; then
        echo "experiments/all.sh: --resume: '$sweep' has a backslash, which this script does not pass to Hydra" >&2
        exit 2
      fi
      shift
      ;;
    *)
      overrides+=("$1")
      ;;
  esac
  shift
done
todo=()
for experiment in ${experiments//,/ }; do
  if [[ -z "$sweep" || ! -f "$sweep/$experiment/summary.json" ]]; then
    todo+=("$experiment")
  fi
done
sweep="${sweep:-outputs/figures/$kind/$(date +%Y-%m-%d_%H-%M-%S)}"
quoted="${sweep//\'/\\\'}"  # a Hydra quoted string: commas, spaces and quotes in the path are kept
if (( ${#todo[@]} )); then
  diffsens run -m "experiment=$(IFS=,; echo "${todo[*]}")" "hydra.sweep.dir='$quoted'" 'hydra.sweep.subdir=${name}' \
    ${overrides[@]+"${overrides[@]}"}
else
  echo "experiments/all.sh: every experiment in $sweep finished; writing the report"
fi
diffsens report "$sweep" --out report
