#!/usr/bin/env bash
# The test command: sets up both environments (idempotent), then runs
#   1. ruff over the repository,
#   2. the server/training/quantisation suite in .venv,
#   3. the LIBERO suite (real simulator, headless) in .venv-libero.
# Extra arguments go to both pytest runs (e.g. ./run_tests.sh -x -k wire).
# SKIP_LIBERO=1 skips the simulator suite (for quick local iterations only; CI never sets it).
set -uo pipefail
cd "$(dirname "$0")"
scripts/setup.sh server || exit 1
if [ "${SKIP_LIBERO:-0}" != 1 ]; then scripts/setup.sh libero || exit 1; fi
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"

status=0
ok_or_no_tests() { [ "$1" = 0 ] || [ "$1" = 5 ]; }   # pytest exit 5 = no tests collected

echo "== ruff =="
.venv/bin/ruff check . || status=1

echo "== server / models / quant / rsd tests (.venv) =="
.venv/bin/python -m pytest tests --ignore-glob='tests/test_libero_*' "$@"
rc=$?; ok_or_no_tests $rc || status=1

if [ "${SKIP_LIBERO:-0}" != 1 ]; then
  echo "== LIBERO tests (.venv-libero, real simulator) =="
  shopt -s nullglob
  files=(tests/test_libero_*.py)
  if [ ${#files[@]} -gt 0 ]; then
    .venv-libero/bin/python -m pytest "${files[@]}" "$@"
    rc=$?; ok_or_no_tests $rc || status=1
  else
    echo "no LIBERO test files"
  fi
fi
exit $status
