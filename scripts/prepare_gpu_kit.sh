#!/usr/bin/env bash
# Copy the data kit a GPU machine needs into .gpu/ (git-ignored; carried to the
# device with carry [".gpu"]): the CIFAR-10 JPEG archive, the official test
# label order and the tool that writes the python batches from them, in
# ../shared's layout (the tool finds its archive at ../data from tools/).
#
#   bash scripts/prepare_gpu_kit.sh [SHARED_DIR]     (default ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
mkdir -p .gpu/tools .gpu/data
cp -f "$SHARED/tools/cifar10_offline.py" .gpu/tools/
cp -f "$SHARED/data/cifar10-jpeg.tar.xz" "$SHARED/data/cifar10-test-labels.txt" .gpu/data/
du -sh .gpu
