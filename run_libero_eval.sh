#!/usr/bin/env bash
# Headless LIBERO evaluation against a running policy server (start one with ./run_inference_server.sh).
#   ./run_libero_eval.sh SUITE --headless [--host H] [--port P] [--trials N] [--tasks 0,3] [--seed S] [--resume] ...
# A thin wrapper around the `vla-eval` entry point of .venv-libero (= python -m client.libero.evaluate; see --help
# for every flag and the suites).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv-libero/bin/vla-eval ] || { echo "error: $PWD/.venv-libero is missing. Create it first with:  scripts/setup.sh libero" >&2; exit 2; }
export MUJOCO_GL="${MUJOCO_GL:-}"   # empty: the client probes EGL, then OSMesa
[ -n "$MUJOCO_GL" ] || unset MUJOCO_GL
exec .venv-libero/bin/vla-eval "$@"
