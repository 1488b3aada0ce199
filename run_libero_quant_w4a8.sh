#!/usr/bin/env bash
# One-shot DuQuant W4A8 serving for a LIBERO suite: show the configuration, list the layers that will be
# quantised (dry run), ask for confirmation, then start the quantised policy server.
#   ./run_libero_quant_w4a8.sh SUITE [MODEL_PATH] [--policy gr00t|openvla|openvla-rsd] [--yes] [--port P]
#                              [--calib-data GLOB|none] [--scan-only] [--plan] [-- EXTRA SERVER FLAGS]
# The logic (flags, recipe defaults, calibration) lives in benchmarks/support/serve_w4a8.py; see --help.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || { echo "run_libero_quant_w4a8.sh: $PWD/.venv is missing; run scripts/setup.sh server first" >&2; exit 2; }
exec .venv/bin/python -m benchmarks.support.serve_w4a8 "$@"
