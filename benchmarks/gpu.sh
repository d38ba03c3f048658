#!/usr/bin/env bash
# Run the benchmark suite on the first CUDA device in one call and print one table.
# Results go to docs/benchmarks-cuda.json (with the GPU name, CUDA version and driver);
# the CPU page docs/benchmarks.md is left as it is. Extra arguments go to
# python -m benchmarks.report, e.g. --plan quick or --sections steps.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec python -m benchmarks.report --device cuda "$@"
