#!/usr/bin/env bash
# Start the policy inference server (default: tcp://127.0.0.1:5555, the embedded default policy).
#   ./run_inference_server.sh [--policy NAME] [--model-path DIR] [--device cpu|cuda] [--port 5555] ...
# All flags go to `python -m server` (see --help). GR00T_DUQUANT_* variables enable DuQuant W4A8.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="$here/.venv/bin/python"
if [ ! -x "$py" ]; then
  echo "run_inference_server.sh: $here/.venv is missing; run scripts/setup.sh server first" >&2
  exit 2
fi
cd "$here"
exec "$py" -m server "$@"
