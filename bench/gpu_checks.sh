#!/usr/bin/env bash
# On a GPU machine, in one go: the GPU tests, the chain's time per event in one process, and the
# fleet's throughput with and without CUDA MPS - what a change to the kernels needs re-measured.
#
#   bench/gpu_checks.sh MU200_EVENTS OUT_DIR
#
# MU200_EVENTS: a mu=200 event directory with its truth (trackfleet simulate --mu 200). Writes into
# OUT_DIR (at most 7 files): gpu_tests.txt, chain.json, timeline.json (bench/gpu_timeline.py; needs
# PyTorch, as the GPU machines have), throughput-<card>-1gpu-mu200{,-mps}.json, log.txt. Environment: PAIRS_MPS ("16x8 8x16"), PAIRS ("8x8"), BATCHES ("1 8 16"), PYTHON (python3).
# Needs CuPy, pytest, pyzmq and supervisor importable (../shared/device/README.md).
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
events=$(realpath "${1:?usage: bench/gpu_checks.sh MU200_EVENTS OUT_DIR}")
out=$(realpath -m "${2:?usage: bench/gpu_checks.sh MU200_EVENTS OUT_DIR}")
py=${PYTHON:-python3}
"$py" -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" 2>/dev/null ||
  { echo "bench/gpu_checks.sh: needs CuPy and a CUDA GPU" >&2; exit 2; }
mkdir -p "$out"
cd "$here"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi -L
  echo "== GPU tests"
  timeout 300 "$py" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_chain.py \
    tests/test_candidates.py -k "cupy or fused" 2>&1 | tail -8 | tee "$out/gpu_tests.txt"
  echo "== chain, one process"
  # shellcheck disable=SC2086
  timeout 300 "$py" bench/chain_bench.py --input "$events" --backend cupy --batch ${BATCHES:-1 8 16} --repeat 3 \
    --tracks "$(mktemp -d)" --json "$out/chain.json" 2>&1 | grep -v "^validate"
  echo "== where one event's time goes (batch 1)"
  timeout 200 "$py" bench/gpu_timeline.py --input "$events" --batch 1 --repeat 2 --json "$out/timeline.json" 2>&1 |
    grep -v "Warning\|warn_once\|up to"
  echo "== fleet without MPS"
  MPS=0 GPUS=0 MUS=200 PAIRS="${PAIRS:-8x8}" timeout 300 bench/run_throughput_study.sh "$events" "$events" "$out" 2>&1 |
    grep -v "^validate"
  echo "== fleet under MPS"
  MPS=1 GPUS=0 MUS=200 PAIRS="${PAIRS_MPS:-16x8 8x16}" timeout 400 bench/run_throughput_study.sh "$events" "$events" "$out" 2>&1 |
    grep -v "^validate"
} 2>&1 | tee "$out/log.txt"
