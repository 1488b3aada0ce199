#!/usr/bin/env bash
# Render the image demonstrations both embedded models train on, from the shipped expert actions (resumable:
# episodes already in the output files are skipped; re-run the same command after an interruption).
#   ACTIONS  compact expert actions (default data/libero_spatial_actions_50.hdf5: 498 episodes, 50 init states/task)
#   OUT      output directory of the per-task LIBERO-layout files (default artifacts/demos/libero_spatial50k8)
#   FRAME_EVERY  observation (and render) every k-th step (default 8: ~4x faster than every step on a CPU)
#   WORKERS  simulator processes (default: every core); PER_TASK (default: all)
# ~45 min on 2 CPU cores for the default 498 episodes; ~5 min on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ACTIONS="${ACTIONS:-data/libero_spatial_actions_50.hdf5}"
OUT="${OUT:-artifacts/demos/libero_spatial50k8}"
per_task=(); [ -n "${PER_TASK:-}" ] && per_task=(--per-task "$PER_TASK")
scripts/setup.sh libero
# one renderer thread per process: the processes, not llvmpipe's threads, use the cores
MUJOCO_GL="${MUJOCO_GL:-egl}" LP_NUM_THREADS="${LP_NUM_THREADS:-1}" .venv-libero/bin/python -m client.libero.render_demos \
  --actions "$ACTIONS" --out "$OUT" --frame-every "${FRAME_EVERY:-8}" --workers "${WORKERS:-$(nproc)}" "${per_task[@]}"
