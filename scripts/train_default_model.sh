#!/usr/bin/env bash
# Build the embedded default model (OpenVLA-RSD, tiny same-architecture) from scratch, reproducibly:
#   demos  -> scripts/render_demos.sh: the shipped expert episodes (data/libero_spatial_actions_50.hdf5) rendered
#             into LIBERO-layout HDF5, every 8th step                           [.venv-libero, ~45 min on 2 cores]
#   rfsq   -> robust RFSQ action tokenizer on the demonstrations' actions
#   main   -> tiny OpenVLA backbone + RFSQ layer head, trained on (image [+ wrist image] [+ state], instruction)
#             -> RFSQ layers
#   draft  -> the deep draft (sized from the main model; proposes any remaining layers), distilled from the frozen
#             main model's greedy layers
#   dagger -> one DAgger round: scripts/collect_dagger.sh runs the trained model on LIBERO (trials 10-29 of every
#             task) recording the scripted expert's chunk from every state it reaches, then main resumes to
#             DAGGER_STAGES with those episodes as --extra-demos, and the draft is distilled again  [docs/dagger.md]
#   install-> copy the trained checkpoint (released layout + rsd/) to models/checkpoints/openvla-rsd-libero-spatial
# Usage: scripts/train_default_model.sh [all|demos|rfsq|main|draft|dagger|install] ; every stage resumes.
#        all = demos rfsq main draft install (the shipped recipe; dagger only when asked for by name)
# Knobs (env): SUITE, DEMOS (glob), OUT, TRIALS_PER_TASK, RFSQ_STEPS, MAIN_STEPS (one stage of N steps) or
#              MAIN_STAGES (default "5000 10000": 5000 steps, then resumed to 10000 with a longer cosine, as the
#              shipped checkpoint was trained), DRAFT_STEPS, PRESET, DEVICE,
#              INIT (a released-format OpenVLA dir to fine-tune instead of a fresh PRESET backbone, e.g. 7B on a GPU;
#                    or an OpenVLA-RSD dir, e.g. the shipped one: its layer head, proprio projector and RFSQ tokenizer
#                    continue too -- the rfsq stage copies INIT/rsd/rfsq instead of training one;
#                    or an OpenVLA-OFT dir, e.g. the seeds' openvla-7b-oft-finetuned-libero-spatial: told apart by its
#                    action_head--*_checkpoint file, its backbone and (PROPRIO=1) proprio projector initialise the
#                    model, its L1 action head is unused; keep WRIST=1, OFT is trained on both cameras),
#              PATCH (main --patch-size: re-grid INIT's vision towers to PATCH-pixel patches, e.g. 8 on the shipped
#                    14-pixel checkpoint -> 14x14 patches per camera; models/openvla/repatch.py),
#              LAYER_WEIGHTS (main --layer-weights: cross-entropy weight per RFSQ layer, default 8,4,4,2,1,0.5,0.5,0.5;
#                    '' = equal), PRESET (fresh backbone size: tiny|small|small_wide_vision|small_p8|medium, default small),
#              BATCH (main --batch-size, default 32), EMA (main --ema, default 0.999), THREADS (torch threads),
#              PROPRIO=1|0 (main --proprio: the normalised 8-D state as one extra prefix token; default 1),
#              WRIST=1|0 (main --wrist: the wrist camera's patches after the agent view's; default 1).
#              PROPRIO/WRIST change the model's inputs: --resume only continues a train_state made with the same ones.
#              EXTRA_DEMOS (glob: main/draft --extra-demos, training split only; e.g. the DAgger episodes of
#                    run_libero_eval.sh --expert-labels DIR: 'DIR/*.hdf5'; see docs/dagger.md),
#              EXTRA_SHARE (main --extra-share: that fraction of every batch from EXTRA_DEMOS; default: uniform),
#              DAGGER_DIR (default $OUT/dagger), DAGGER_STAGES (main's step target(s) with the DAgger episodes,
#                    default "14000"), TRIALS / FIRST_TRIAL / WORKERS (scripts/collect_dagger.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
SUITE="${SUITE:-libero_spatial}"
DEMO_DIR="${DEMO_DIR:-artifacts/demos/${SUITE}50k8}"
DEMOS="${DEMOS:-$DEMO_DIR/*.hdf5}"
OUT="${OUT:-artifacts/train/openvla-rsd-$SUITE}"
DEVICE="${DEVICE:-cpu}"
PRESET="${PRESET:-small}"
INSTALL_DIR=models/checkpoints/openvla-rsd-libero-spatial
py=.venv/bin/python
mkdir -p "$OUT"

run_demos() {
  OUT="$DEMO_DIR" ACTIONS="data/${SUITE}_actions_50.hdf5" scripts/render_demos.sh
}
run_rfsq() {
  # an OpenVLA-RSD INIT's layer head predicts its own tokenizer's codes: continue with that tokenizer
  if [ -n "${INIT:-}" ] && [ -f "$INIT/rsd/rsd_config.json" ]; then
    [ -d "$OUT/rfsq" ] || cp -r "$INIT/rsd/rfsq" "$OUT/rfsq"
    return 0
  fi
  $py -m rsd.train_rfsq --data "$DEMOS" --mode robust --steps "${RFSQ_STEPS:-3000}" --out "$OUT/rfsq" --resume
}
run_main() {
  local init=(); [ -n "${INIT:-}" ] && init=(--init "$INIT")
  [ -n "${PATCH:-}" ] && init+=(--patch-size "$PATCH")
  local inputs=(); [ "${PROPRIO:-1}" = 1 ] && inputs+=(--proprio); [ "${WRIST:-1}" = 1 ] && inputs+=(--wrist)
  [ -n "${EXTRA_DEMOS:-}" ] && inputs+=(--extra-demos "$EXTRA_DEMOS")
  [ -n "${EXTRA_SHARE:-}" ] && inputs+=(--extra-share "$EXTRA_SHARE")
  # MAIN_STAGES: the run's step targets in order; each later target resumes the previous stage's state with a
  # longer cosine (the LR jumps back to the new schedule's value at that step: a warm restart). MAIN_STEPS=N is
  # one stage of N steps. A stage already reached is a no-op, so the whole list resumes like any other stage.
  local stages="${MAIN_STEPS:-${MAIN_STAGES:-5000 10000}}"
  for steps in $stages; do
    $py -m rsd.train_vla main --demos "$DEMOS" --rfsq "$OUT/rfsq" --out "$OUT/model" --preset "$PRESET" \
      --steps "$steps" --batch-size "${BATCH:-32}" --ema "${EMA:-0.999}" --device "$DEVICE" \
      --threads "${THREADS:-0}" --layer-weights "${LAYER_WEIGHTS-8,4,4,2,1,0.5,0.5,0.5}" \
      --eval-every 1000 --resume \
      "${init[@]}" "${inputs[@]}"
  done
}
run_draft() {
  local extra=(); [ -n "${EXTRA_DEMOS:-}" ] && extra=(--extra-demos "$EXTRA_DEMOS")
  $py -m rsd.train_vla draft --model "$OUT/model" --demos "$DEMOS" --steps "${DRAFT_STEPS:-3000}" --device "$DEVICE" \
    --threads "${THREADS:-0}" "${extra[@]}" \
    --kind deep --save-dtype float16
}
run_dagger() {
  local dir="${DAGGER_DIR:-$OUT/dagger}"
  # the episodes come from the model as it was before this round: a finished collection is never redone
  if [ ! -f "$dir/collected" ]; then
    scripts/collect_dagger.sh "$OUT/model" "$dir"
    touch "$dir/collected"
  fi
  EXTRA_DEMOS="$dir/labels/*.hdf5" MAIN_STEPS="${DAGGER_STAGES:-14000}" run_main
  EXTRA_DEMOS="$dir/labels/*.hdf5" run_draft
}
run_install() {
  rm -rf "$INSTALL_DIR.tmp" && mkdir -p "$INSTALL_DIR.tmp"
  # train_state/ (and a train_state.tmp/.old left by an interrupted checkpoint save) is the resume state, not the model
  (cd "$OUT/model" && find . \( -path ./train_state -o -path './train_state.*' \) -prune -o -type f -print) | while read -r f; do
    mkdir -p "$INSTALL_DIR.tmp/$(dirname "$f")" && cp "$OUT/model/$f" "$INSTALL_DIR.tmp/$f"
  done
  rm -rf "$INSTALL_DIR" && mv "$INSTALL_DIR.tmp" "$INSTALL_DIR"
  du -sh "$INSTALL_DIR"
}
case "$stage" in
  demos) run_demos ;; rfsq) run_rfsq ;; main) run_main ;; draft) run_draft ;; dagger) run_dagger ;;
  install) run_install ;;
  # not dagger: every DAgger round so far made the policy worse (docs/dagger.md); the shipped recipe has none
  all) run_demos; run_rfsq; run_main; run_draft; run_install ;;
  *) echo "usage: $0 [all|demos|rfsq|main|draft|dagger|install]" >&2; exit 2 ;;
esac
