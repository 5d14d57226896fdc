#!/usr/bin/env bash
# The whole GPU throughput study in one command: mu=200 and mu=50 events through the fleet on one
# GPU and on all the listed GPUs, best (instances per GPU, batch) pair each, physics of the timed path.
#
#   bench/run_throughput_study.sh MU200_EVENTS MU50_EVENTS [OUT_DIR]
#
# Writes throughput-<card>-<n>gpu-mu<mu>[-mps][-broker-per-gpu].json (bench/throughput_study.py) for
# every GPU count n in COUNTS (default: 1 and the number of GPUS; the first n of GPUS are used).
# Defaults are the setup that gave the best throughput (bench/RESULTS.md): workers under CUDA MPS when
# nvidia-cuda-mps-control is on PATH, one broker per GPU, 4 producer processes, and the instances x
# batch pairs 8x8, 16x8 and 8x16 (the best pair is reported, every pair is in the file's grid).
# Environment: GPUS (default "0 1"), COUNTS, MUS ("200 50"), PAIRS ("8x8 16x8 8x16"; empty: the
# INSTANCES x BATCH grid, defaults "8" x "4 8"), WINDOW_S (10), BACKEND (cupy), PYTHON (python3);
# MPS (1: require MPS, 0: time-sliced workers; default: 1 when available); BROKER_PER_GPU (1; 0: one
# broker for all GPUs); PRODUCERS (closed-loop producer processes, 4); IPC=1 (brokers on ipc://
# endpoints instead of tcp://127.0.0.1).
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
pairs=${PAIRS-8x8 16x8 8x16}
[ -n "$pairs" ] && grid=(--pairs $pairs)
if [ -z "${MPS:-}" ]; then
  command -v nvidia-cuda-mps-control >/dev/null && MPS=1 || MPS=0
  echo "run_throughput_study: MPS=$MPS (nvidia-cuda-mps-control $([ "$MPS" = 1 ] || echo "not ")found)" >&2
fi
mps=()
[ "$MPS" = 1 ] && mps=(--mps)
[ "${BROKER_PER_GPU:-1}" = 1 ] && mps+=(--broker-per-gpu)
[ "${IPC:-0}" = 1 ] && mps+=(--ipc)
counts=(${COUNTS:-$( [ "${#gpus[@]}" -gt 1 ] && echo "1 ${#gpus[@]}" || echo 1 )})
for n in "${counts[@]}"; do
  [ "$n" -ge 1 ] && [ "$n" -le "${#gpus[@]}" ] || { echo "COUNTS: $n is not between 1 and ${#gpus[@]}" >&2; exit 2; }
done
for mu in ${MUS:-200 50}; do
  case "$mu" in 200) events=$mu200 ;; 50) events=$mu50 ;; *) echo "MUS: only 200 and 50" >&2; exit 2 ;; esac
  for n in "${counts[@]}"; do
    # shellcheck disable=SC2086
    "$py" bench/throughput_study.py --input "$events" --mu "$mu" --gpus ${gpus[@]:0:$n} "${grid[@]}" \
      ${mps[@]+"${mps[@]}"} --producers "${PRODUCERS:-4}" --seconds "${WINDOW_S:-10}" --backend "${BACKEND:-cupy}" --warmup-s 3 --out "$out"
  done
done
