#!/usr/bin/env bash
# Train the tiny GR00T N1.5 policy (Eagle-style backbone + flow-matching DiT head) on LIBERO demonstrations and
# install it, float16, in the released GR00T layout at models/checkpoints/gr00t-n1.5-tiny-libero-spatial.
#   demos   -> scripts/render_demos.sh (the 498 shipped expert episodes, every 8th step rendered; resumable)
#   train   -> python -m models.gr00t.train (resumable: re-run the same command after an interruption)
#   finetune -> a second cosine from train's result at twice the batch and half the LR (FT_STEPS, default 8000;
#              0 skips it): held-out action MAE 0.040 -> 0.027, libero_spatial 33 -> 38/100 (README)
#   install -> re-save the last stage's model (FT_OUT, or OUT with FT_STEPS=0) as float16 shards (the loader
#              casts back to float32) into the checkpoint folder, with its serving.json (how it is served:
#              8 Euler steps from zero initial noise, 8 of 16 actions per query; models/gr00t/train.py)
# Usage: scripts/train_gr00t_model.sh [all|demos|train|finetune|install]
# Knobs (env): DEMOS (glob of LIBERO-layout HDF5 with both cameras + state_8d; render them with
#              scripts/render_demos.sh), OUT, STEPS, BATCH, LR, EMA, DEVICE, THREADS, INIT,
#              PRESET (fresh model size: tiny, the shipped one; tiny_wide_vision, its vision tower twice as wide
#              and 3 layers deep; small),
#              EXTRA_DEMOS (glob: --extra-demos, training split only, e.g. DAgger episodes; docs/dagger.md),
#              EXTRA_SHARE (--extra-share: that fraction of every batch from EXTRA_DEMOS; default: uniform),
#              FT_OUT (default OUT_ft), FT_STEPS (8000), FT_BATCH (32), FT_LR (1.5e-4)
set -euo pipefail
cd "$(dirname "$0")/.."
stage="${1:-all}"
DEMOS="${DEMOS:-artifacts/demos/libero_spatial50k8/*.hdf5}"
OUT="${OUT:-artifacts/gr00t/libero_spatial}"
FT_OUT="${FT_OUT:-${OUT}_ft}"
FT_STEPS="${FT_STEPS:-8000}"
INSTALL_DIR=models/checkpoints/gr00t-n1.5-tiny-libero-spatial
py="${PY:-.venv/bin/python}"  # PY: another interpreter (tests pass a recorder)

run_train() {
  local init=(); [ -n "${INIT:-}" ] && init=(--init "$INIT")
  [ -n "${EXTRA_DEMOS:-}" ] && init+=(--extra-demos "$EXTRA_DEMOS")
  [ -n "${EXTRA_SHARE:-}" ] && init+=(--extra-share "$EXTRA_SHARE")
  $py -m models.gr00t.train --demos "$DEMOS" --out "$OUT" --preset "${PRESET:-tiny}" --steps "${STEPS:-8000}" \
    --batch-size "${BATCH:-16}" --lr "${LR:-3e-4}" --ema "${EMA:-0.999}" --denoising-steps 8 \
    --device "${DEVICE:-cpu}" --threads "${THREADS:-0}" --eval-every "${EVAL_EVERY:-1000}" --resume "${init[@]}"
}
run_finetune() {
  [ "$FT_STEPS" = 0 ] && return 0
  INIT="$OUT" OUT="$FT_OUT" STEPS="$FT_STEPS" BATCH="${FT_BATCH:-32}" LR="${FT_LR:-1.5e-4}" run_train
}
run_install() {
  local src="$FT_OUT"; [ "$FT_STEPS" = 0 ] && src="$OUT"
  rm -rf "$INSTALL_DIR.tmp"
  $py - "$src" "$INSTALL_DIR.tmp" <<'EOF'
import shutil
import sys
from pathlib import Path

import torch

import models
from models.common.serving import SERVING_FILE
from models.gr00t.train import write_serving
from models.gr00t.tiny import save_pretrained

model = models.load_pretrained("gr00t", sys.argv[1])
save_pretrained(model, sys.argv[2], num_shards=2, dtype=torch.float16)
src = Path(sys.argv[1]) / SERVING_FILE
if src.is_file():  # the trainer wrote how it is served
    shutil.copy(src, Path(sys.argv[2]) / SERVING_FILE)
else:  # trained before trainers wrote one: the project's GR00T serving
    write_serving(sys.argv[2], denoising_steps=8)
EOF
  rm -rf "$INSTALL_DIR" && mv "$INSTALL_DIR.tmp" "$INSTALL_DIR"
  du -sh "$INSTALL_DIR"
}
case "$stage" in
  demos) scripts/render_demos.sh ;; train) run_train ;; finetune) run_finetune ;; install) run_install ;;
  all) scripts/render_demos.sh; run_train; run_finetune; run_install ;;
  *) echo "usage: $0 [all|demos|train|finetune|install]" >&2; exit 2 ;;
esac
