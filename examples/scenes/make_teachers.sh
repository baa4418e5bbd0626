#!/usr/bin/env bash
# Retrain the shipped scenes teachers from their configs (CPU: about 10 minutes each):
#   scenes-segmentation (SegNet, 5 classes) and scenes-depth (SegNet, L1 on depth maps).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
for t in segmentation depth; do
  kamal train "$here/teacher-$t.yaml" --output "$work/teacher-$t" --quiet
  mkdir -p "$here/teachers/scenes-$t"
  cp "$work/teacher-$t/model/"{config.json,model.safetensors,README.md} "$here/teachers/scenes-$t/"
done
rm -rf "$work"
