#!/usr/bin/env bash
# The realistic workload of benchmarks/realistic.py on one CUDA GPU: 5,120 JPEGs, two
# ResNet-50 teachers at 224 px, a ResNet-18 student, batch 256, bf16, compiled student,
# 4 stored views per image. Runs unattended in under 8 minutes and writes the
# "realistic_gpu" key of docs/benchmarks.json and its section of docs/benchmarks.md
# (the GPU is named there).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import sys, torch; sys.exit(None if torch.cuda.is_available() else 'benchmarks/gpu.sh needs a CUDA GPU')"
exec timeout 480 python3 benchmarks/realistic.py --device cuda --images 5120 --batch 256 \
    --epochs 5 --views 4 --precision bf16 --compile --repeats 2 \
    --key realistic_gpu
