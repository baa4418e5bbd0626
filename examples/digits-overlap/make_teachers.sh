#!/usr/bin/env bash
# Train the two teachers this example adds to examples/digits' digits-0-4 (under a minute on
# a laptop CPU): digits-3-7 (small-vgg, 16 px) and digits-6-9 (timm test_resnet, 32 px).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
for t in 3-7 6-9; do
  kamal train "$here/teacher-$t.yaml" --output "$work/teacher-$t" --quiet
  mkdir -p "$here/teachers/digits-$t"
  cp "$work/teacher-$t/model/"{config.json,model.safetensors,README.md} "$here/teachers/digits-$t/"
done
rm -rf "$work"
