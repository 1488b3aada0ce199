#!/usr/bin/env bash
# Headless LIBERO evaluation against a running policy server (start one with ./run_inference_server.sh).
#   ./run_libero_eval.sh SUITE [--headless] [--host H] [--port P] [--trials N] [--tasks 0,3] [--seed S]
#                        [--replan K] [--video-dir D] [--results R] [--resume] [--stop-on-error] [--max-steps M]
# SUITE: libero_spatial | libero_object | libero_goal | libero_10 | libero_90
# Runs in .venv-libero (created by scripts/setup.sh libero); see python -m client.libero.evaluate --help.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv-libero/bin/python
if [ ! -x "$PY" ]; then
  echo "error: $PWD/.venv-libero is missing. Create it first with:  scripts/setup.sh libero" >&2
  exit 2
fi
usage="usage: $0 SUITE [--headless] [options]   (SUITE: libero_spatial|libero_object|libero_goal|libero_10|libero_90)"
case "${1:-}" in
  "") echo "$usage" >&2; exit 2 ;;
  -h|--help) ;;
  -*) echo "$usage" >&2; exit 2 ;;
esac
export MUJOCO_GL="${MUJOCO_GL:-}"   # empty: the client probes EGL, then OSMesa
[ -n "$MUJOCO_GL" ] || unset MUJOCO_GL
exec "$PY" -m client.libero.evaluate "$@"
