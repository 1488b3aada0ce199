#!/usr/bin/env bash
# The main job end to end on a fresh machine: set up both environments, start the inference server
# on the embedded default model, run a headless LIBERO evaluation against it, stop the server.
#   ./run_demo.sh [SUITE] [extra run_libero_eval.sh flags]     (default: libero_spatial --trials 1 --tasks 0,1)
# Outputs: artifacts/demo/results.json, artifacts/demo/videos/*.mp4, artifacts/demo/server.log
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh all
suite="${1:-libero_spatial}"; shift || true
extra=("$@"); [ ${#extra[@]} -gt 0 ] || extra=(--trials 1 --tasks 0,1)
port="${DEMO_PORT:-5555}"
out=artifacts/demo
mkdir -p "$out"
# every demo is a fresh evaluation: an earlier run's results are kept beside it, not continued or refused
if [ -e "$out/results.json" ]; then
  prev="$out/results.$(date -r "$out/results.json" +%Y%m%d-%H%M%S).json"
  mv "$out/results.json" "$prev" && echo "[demo] the previous results moved to $prev"
fi

./run_inference_server.sh --port "$port" > "$out/server.log" 2>&1 &
server_pid=$!
trap 'kill -TERM $server_pid 2>/dev/null; wait $server_pid 2>/dev/null || true' EXIT
echo "[demo] waiting for the server (log: $out/server.log)"
.venv/bin/python -m client.policy_client wait --port "$port" --timeout 600 --pid "$server_pid" | sed 's/^/[demo] /' \
  || { echo "[demo] server did not become ready; see $out/server.log" >&2; exit 1; }
./run_libero_eval.sh "$suite" --headless --port "$port" --video-dir "$out/videos" --results "$out/results.json" \
  "${extra[@]}"
echo "[demo] results: $out/results.json, videos: $out/videos/"
