#!/usr/bin/env bash
# List the Linear layers DuQuant would quantise (dry run), without loading weights, and exit 0.
#   ./test_duquant_dryrun.sh                              # the GR00T N1.5 shipped in models/checkpoints
#   ./test_duquant_dryrun.sh --policy gr00t --model-path /ckpt/gr00t-n1.5-libero-spatial
#   ./test_duquant_dryrun.sh --policy openvla --model-path /ckpt/openvla-7b
#   ./test_duquant_dryrun.sh --policy demo-gr00t          # built-in tree with the real GR00T N1.5 names
# Every GR00T_DUQUANT_* variable in the environment applies (INCLUDE, EXCLUDE, SCOPE, LAYERS, WBITS, ...);
# add --debug to see every Linear and why it was (not) selected.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/vla-quant-scan ] || { echo "test_duquant_dryrun.sh: $PWD/.venv is missing; run scripts/setup.sh server first" >&2; exit 2; }
export GR00T_DUQUANT_DRYRUN=1
exec .venv/bin/vla-quant-scan "$@"   # = python -m quant.scan
