#!/usr/bin/env bash
# The throughput / GPU-utilization study of the traccc-as-a-service work, in one command, on a GPU machine:
# worker instances per GPU x closed-loop concurrency, measured with perf_analyzer's stability rule by
# `trackfleet perf`, which brings the fleet up itself (broker + CuPy workers, added as the count grows).
#
#   bench/run_perf_sweep.sh EVENTS_DIR [OUT_DIR] [more trackfleet perf options]
#
# OUT_DIR defaults to $OUT when set, else bench/perf-<date>. It receives perf.csv, perf.json (rows, command,
# machine, GPUs), perf.log and four PNGs (when matplotlib is installed; otherwise redraw them anywhere with
# `trackfleet perf --plot-only OUT_DIR`), plus fleet-logs.txt if the fleet failed to come up: at most 8 files.
# The grid and bounds can be changed through the environment: INSTANCES (1,2,4,6,8), CONCURRENCY
# (1,2,4,8,12,16), GPUS (0), WINDOW_S (1.5), MAX_DURATION_S (480: levels beyond are skipped, outputs kept),
# PYTHON (python3).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=$(realpath -m "${1:?usage: bench/run_perf_sweep.sh EVENTS_DIR [OUT_DIR] [perf options]}")
out=$(realpath -m "${2:-${OUT:-$here/bench/perf-$(date +%Y%m%d-%H%M)}}")
shift $(($# >= 2 ? 2 : $#))
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export TRACKFLEET_CACHE_DIR="${TRACKFLEET_CACHE_DIR:-${TMPDIR:-/tmp}/trackfleet-cache}"
exec "${PYTHON:-python3}" -m metrics.perf -v \
  --input "$events" --output "$out" --backend cupy --gpus "${GPUS:-0}" \
  --instances "${INSTANCES:-1,2,4,6,8}" --concurrency "${CONCURRENCY:-1,2,4,8,12,16}" \
  --window-s "${WINDOW_S:-1.5}" --stable-windows 3 --stability 0.1 --max-windows 6 --warmup-s 3 \
  --max-duration-s "${MAX_DURATION_S:-480}" "$@"
