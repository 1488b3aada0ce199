#!/usr/bin/env bash
# Render the image demonstrations both embedded models train on, from the shipped expert actions (resumable:
# episodes already in the output files are skipped; re-run the same command after an interruption).
# Usage: scripts/render_demos.sh [render|every4|merge]
#   render  (default) observations every FRAME_EVERY-th step into OUT
#   every4  the frames the default render skipped (phase 4 of 8, into ${OUT}p4; another ~45 min on 2 cores), then
#           merge: OUT + ${OUT}p4 -> OUT4 (default artifacts/demos/libero_spatial50k4), observations every 4th step
#   merge   only the join (seconds per task, no simulator)
# Knobs (env):
#   ACTIONS  compact expert actions (default data/libero_spatial_actions_50.hdf5: 498 episodes, 50 init states/task)
#   OUT      output directory of the per-task LIBERO-layout files (default artifacts/demos/libero_spatial50k8)
#   FRAME_EVERY  observation (and render) every k-th step (default 8: ~4x faster than every step on a CPU)
#   FRAME_PHASE  shift of the recorded steps, 0 <= P < FRAME_EVERY (default 0)
#   WORKERS  simulator processes (default: every core); PER_TASK (default: all)
# ~45 min on 2 CPU cores for the default 498 episodes; ~5 min on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-render}"
ACTIONS="${ACTIONS:-data/libero_spatial_actions_50.hdf5}"
OUT="${OUT:-artifacts/demos/libero_spatial50k8}"
OUT4="${OUT4:-artifacts/demos/libero_spatial50k4}"
per_task=(); [ -n "${PER_TASK:-}" ] && per_task=(--per-task "$PER_TASK")
scripts/setup.sh libero
render() {  # $1 output directory, $2 frame phase
  # one renderer thread per process: the processes, not llvmpipe's threads, use the cores
  MUJOCO_GL="${MUJOCO_GL:-egl}" LP_NUM_THREADS="${LP_NUM_THREADS:-1}" .venv-libero/bin/python -m client.libero.render_demos \
    --actions "$ACTIONS" --out "$1" --frame-every "${FRAME_EVERY:-8}" --frame-phase "$2" \
    --workers "${WORKERS:-$(nproc)}" "${per_task[@]}"
}
merge() { .venv-libero/bin/python -m client.libero.render_demos --merge "$OUT" "${OUT}p4" --out "$OUT4"; }
case "$stage" in
  render) render "$OUT" "${FRAME_PHASE:-0}" ;;
  every4) FRAME_EVERY=8 render "${OUT}p4" 4; merge ;;
  merge) merge ;;
  *) echo "usage: $0 [render|every4|merge]" >&2; exit 2 ;;
esac
