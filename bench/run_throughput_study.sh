#!/usr/bin/env bash
# The whole GPU throughput study in one command: mu=200 and mu=50 events through the fleet on one
# GPU and on all the listed GPUs, best (instances per GPU, batch) pair each, physics of the timed path.
#
#   bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]
#
# Writes throughput-<card>-<n>gpu-mu<mu>.json (bench/throughput_study.py) for n = 1 and n = the
# number of GPUS. Environment: GPUS (default "0 1"), INSTANCES ("8"), BATCH ("4 8"), WINDOW_S (10),
# BACKEND (cupy), PYTHON (python3). Needs pyzmq and supervisor importable (see ../shared/device/README.md on the GPU
# machine) and CuPy.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
mu200=$(realpath "${1:?usage: bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]}")
mu50=$(realpath "${2:?usage: bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]}")
out=$(realpath -m "${3:-${OUT:-$here/bench/results}}")
gpus=(${GPUS:-0 1})
py=${PYTHON:-python3}
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
for mu in 200 50; do
  events=$([ "$mu" = 200 ] && echo "$mu200" || echo "$mu50")
  for set in "${gpus[0]}" "${gpus[*]}"; do
    # shellcheck disable=SC2086
    "$py" bench/throughput_study.py --input "$events" --mu "$mu" --gpus $set --instances ${INSTANCES:-8} \
      --batch ${BATCH:-4 8} --seconds "${WINDOW_S:-10}" --backend "${BACKEND:-cupy}" --warmup-s 3 --out "$out"
    [ "${#gpus[@]}" -gt 1 ] || break
  done
done
