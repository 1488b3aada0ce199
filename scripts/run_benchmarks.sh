#!/usr/bin/env bash
# Run every benchmark in benchmarks/ (pass --quick for the CI size). Each prints a table and, as its
# last line, one JSON object of key figures. LIBERO benchmarks run in .venv-libero. Benchmarks are modules
# (python -m benchmarks.bench_NAME from the repository root), so they import benchmarks.support normally.
set -uo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
mkdir -p artifacts/benchmarks
status=0
for b in benchmarks/bench_*.py; do
  name=$(basename "$b" .py)
  py=.venv/bin/python
  case "$name" in bench_libero*) py=.venv-libero/bin/python ;; esac
  echo "== $name =="
  if "$py" -m "benchmarks.$name" "$@" > "artifacts/benchmarks/$name.log" 2>&1; then
    tail -n 40 "artifacts/benchmarks/$name.log"
  else
    echo "[bench] $name FAILED:"; tail -n 40 "artifacts/benchmarks/$name.log"; status=1
  fi
done
exit $status
