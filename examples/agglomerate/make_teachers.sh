#!/usr/bin/env bash
# Retrain the shipped shape teacher (a timm test_resnet, 64 px; CPU: about 5 minutes).
# The segmentation and depth teachers are the scenes example's: examples/scenes/make_teachers.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
kamal train "$here/teacher-shapes.yaml" --output "$work/teacher-shapes" --quiet
mkdir -p "$here/teachers/scenes-shape"
cp "$work/teacher-shapes/model/"{config.json,model.safetensors,README.md} "$here/teachers/scenes-shape/"
rm -rf "$work"
