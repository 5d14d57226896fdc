#!/usr/bin/env bash
# The whole GPU throughput study in one command: mu=200 and mu=50 events through the fleet on one
# GPU and on all the listed GPUs, best (instances per GPU, batch) pair each, physics of the timed path.
#
#   bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]
#
# Writes throughput-<card>-<n>gpu-mu<mu>[-mps].json (bench/throughput_study.py) for every GPU count n
# in COUNTS (default: 1 and the number of GPUS; the first n of GPUS are used). Environment: GPUS
# (default "0 1"), COUNTS, MUS ("200 50"), INSTANCES ("8"), BATCH ("4 8"), WINDOW_S (10),
# BACKEND (cupy), PYTHON (python3); PAIRS (e.g. "8x8 4x16": exactly these instances x batch pairs
# instead of the INSTANCES x BATCH grid); MPS=1 (workers under the CUDA Multi-Process Service, --mps;
# needs nvidia-cuda-mps-control); PRODUCERS (closed-loop producer processes, default 1);
# BROKER_PER_GPU=1 (one broker per GPU, the producers share events among them).
# Needs pyzmq and supervisor importable (see ../shared/device/README.md
# on the GPU machine) and CuPy.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
mu200=$(realpath "${1:?usage: bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]}")
mu50=$(realpath "${2:?usage: bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]}")
out=$(realpath -m "${3:-${OUT:-$here/bench/results}}")
gpus=(${GPUS:-0 1})
py=${PYTHON:-python3}
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
grid=(--instances ${INSTANCES:-8} --batch ${BATCH:-4 8})
[ -n "${PAIRS:-}" ] && grid=(--pairs $PAIRS)
mps=()
[ "${MPS:-0}" = 1 ] && mps=(--mps)
[ "${BROKER_PER_GPU:-0}" = 1 ] && mps+=(--broker-per-gpu)
counts=(${COUNTS:-$( [ "${#gpus[@]}" -gt 1 ] && echo "1 ${#gpus[@]}" || echo 1 )})
for n in "${counts[@]}"; do
  [ "$n" -ge 1 ] && [ "$n" -le "${#gpus[@]}" ] || { echo "COUNTS: $n is not between 1 and ${#gpus[@]}" >&2; exit 2; }
done
for mu in ${MUS:-200 50}; do
  case "$mu" in 200) events=$mu200 ;; 50) events=$mu50 ;; *) echo "MUS: only 200 and 50" >&2; exit 2 ;; esac
  for n in "${counts[@]}"; do
    # shellcheck disable=SC2086
    "$py" bench/throughput_study.py --input "$events" --mu "$mu" --gpus ${gpus[@]:0:$n} "${grid[@]}" \
      ${mps[@]+"${mps[@]}"} --producers "${PRODUCERS:-1}" --seconds "${WINDOW_S:-10}" --backend "${BACKEND:-cupy}" --warmup-s 3 --out "$out"
  done
done
