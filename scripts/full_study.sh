#!/usr/bin/env bash
# The full study on a CUDA machine, packed into OUT_DIR (by default at most 8
# files of at most 16 MiB; --max-files, --max-file-mib, --max-total-mib):
# weight shards, weights.json, SHA256SUMS, results.tar.gz and this run's log
# (study_log.txt). See `python3 scripts/remote_study.py --help`.
#
#   bash scripts/full_study.sh OUT_DIR [--seeds 43 44] [--bench] [--compile MODE]
#   CNNSTRESS_STUDY_PROFILE=smoke CNNSTRESS_STUDY_DEVICE=cpu bash scripts/full_study.sh /tmp/out   # CPU proof
#
# Needs the data kit in .gpu/ (scripts/prepare_gpu_kit.sh) unless data/ holds
# CIFAR-10 already. Uses the python3 on PATH ($PYTHON to change) with whatever
# torch it has; the versions are logged. Exit status: 0 done, 1 OUT_DIR breaks
# the transfer rules or weights were not published, 2 bad input, 3 the smoke
# run on the device failed.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/full_study.sh OUT_DIR [--seeds N ...] [--bench] [--compile MODE]" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd); shift   # absolute: the study runs from the repository root
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
"$PY" scripts/remote_study.py "$OUT" "$@" 2>&1 | tee -a "$OUT/study_log.txt"
exit "${PIPESTATUS[0]}"
