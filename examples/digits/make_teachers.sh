#!/usr/bin/env bash
# Retrain the shipped digits teachers from their configs (about a minute on a laptop CPU):
#   digits-0-4 (small-cnn), digits-5-9 (small-vgg), digits-5-9-cnn (small-cnn, same as 0-4).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
for t in 0-4 5-9 5-9-cnn; do
  kamal train "$here/teacher-$t.yaml" --output "$work/teacher-$t" --quiet
  mkdir -p "$here/teachers/digits-$t"
  cp "$work/teacher-$t/model/"{config.json,model.safetensors,README.md} "$here/teachers/digits-$t/"
done
rm -rf "$work"
