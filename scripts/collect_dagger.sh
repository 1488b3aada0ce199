#!/usr/bin/env bash
# DAgger data: run a trained policy on LIBERO and record, at every query, the scripted expert's chunk from the state
# the policy reached (client/libero/dagger.py; docs/dagger.md). Resumable: re-run the same command after an
# interruption (finished episodes are skipped).
#   scripts/collect_dagger.sh MODEL_DIR OUT_DIR
#   -> OUT_DIR/labels/<task>_trial<k>.hdf5 (train with --extra-demos 'OUT_DIR/labels/*.hdf5'), OUT_DIR/results.json
#      (the policy's own success on those episodes), OUT_DIR/server.log
# Knobs (env): POLICY (openvla-rsd | gr00t, default openvla-rsd), SUITE (libero_spatial), FIRST_TRIAL (10: clear of
#              an evaluation's trials 0-9), TRIALS (20 per task), WORKERS (simulator processes, default: every core),
#              MIX (--expert-mix, DAgger's beta, default 0), SERVER_ARGS (extra server flags; the model is served
#              as its checkpoint's serving.json says, as the evaluation matrix serves it: for a GR00T the trainer
#              wrote 8 Euler steps from zero initial noise, 8 of its 16 actions per query).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 MODEL_DIR OUT_DIR" >&2; exit 2; }
model="$1"; out="$2"
[ -d "$model" ] || { echo "collect_dagger.sh: MODEL_DIR $model is not a directory" >&2; exit 2; }
POLICY="${POLICY:-openvla-rsd}"
mkdir -p "$out"
port="$(.venv/bin/python -c 'from client.testing import free_port; print(free_port())')"
[ "$POLICY" = gr00t ] && [ ! -f "$model/serving.json" ] && [ -z "${SERVER_ARGS:-}" ] && echo "collect_dagger.sh:" \
  "$model has no serving.json (trained before trainers wrote one): served with the server's defaults; pass" \
  "SERVER_ARGS='--denoising-steps 8 --policy-option replan_steps=8 --policy-option initial_noise=zero' to serve it" \
  "as the project serves its GR00T" >&2
# shellcheck disable=SC2086
./run_inference_server.sh --policy "$POLICY" --model-path "$model" --port "$port" ${SERVER_ARGS:-} \
  > "$out/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
resume=(); [ -f "$out/results.json" ] && resume=(--resume)
./run_libero_eval.sh "${SUITE:-libero_spatial}" --headless --port "$port" --first-trial "${FIRST_TRIAL:-10}" \
  --trials "${TRIALS:-20}" --workers "${WORKERS:-$(nproc)}" --no-video --results "$out/results.json" \
  --expert-labels "$out/labels" --expert-mix "${MIX:-0}" "${resume[@]}"
echo "DAgger episodes: $(find "$out/labels" -name '*.hdf5' | wc -l) in $out/labels"
