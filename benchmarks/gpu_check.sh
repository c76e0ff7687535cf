#!/usr/bin/env bash
# GPU check with torch alone (no fbgemm, torchrec or faiss needed; no network): encoder + loss
# parity CUDA vs CPU, HSTU step throughput (fp32, bf16) and a bf16 matmul baseline, as JSON.
#   benchmarks/gpu_check.sh                  # on CUDA, default sizes
#   benchmarks/gpu_check.sh --device cpu --batch 4 --max-len 16 --steps 1 --matmul-size 64
#   PYTHON=/path/to/python benchmarks/gpu_check.sh --out gpu_check.json
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
