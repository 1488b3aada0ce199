#!/usr/bin/env bash
# Start the policy inference server (default: tcp://127.0.0.1:5555, the embedded default policy).
#   ./run_inference_server.sh [--policy NAME] [--model-path DIR] [--device cpu|cuda] [--port 5555] ...
# A thin wrapper around the `vla-serve` entry point of .venv (= python -m server; see --help).
# GR00T_DUQUANT_* variables enable DuQuant W4A8.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$here/.venv/bin/vla-serve" ] || { echo "run_inference_server.sh: $here/.venv is missing; run scripts/setup.sh server first" >&2; exit 2; }
cd "$here"
exec "$here/.venv/bin/vla-serve" "$@"
