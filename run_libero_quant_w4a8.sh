#!/usr/bin/env bash
# One-shot DuQuant W4A8 serving for a LIBERO suite: show the configuration, list the layers that will be
# quantised (dry run), ask for confirmation, then start the quantised policy server.
#
#   ./run_libero_quant_w4a8.sh SUITE [MODEL_PATH] [--policy gr00t|openvla|openvla-rsd] [--yes] [--port P]
#                              [--device cpu|cuda] [--denoising-steps N] [--calib-data GLOB|none]
#                              [--scan-only] [-- EXTRA SERVER FLAGS]
#
#   ./run_libero_quant_w4a8.sh libero_spatial                                   # artifacts/gr00t/libero_spatial
#   ./run_libero_quant_w4a8.sh libero_goal /ckpt/gr00t-n1.5-libero-goal --yes --port 5556
#   then, in another terminal:  ./run_libero_eval.sh libero_spatial --headless --port 5555
#
# Defaults are the seed's (W4 A8, BLOCK 16, PERMUTE 1, ROW_ROT restore, ACT_PCT 99.9, CALIB_STEPS 32, LS 0.15,
# PACKDIR artifacts/duquant_packs/<policy>); any GR00T_DUQUANT_* already in the environment wins. Layer selection
# uses quant/'s defaults (checked against the real GR00T N1.5 / OpenVLA module names), not the seed's regexes.
# Calibration: CALIB_STEPS observations from the suite's demonstrations (artifacts/demos/SUITE/*.hdf5) when they
# exist (gr00t and openvla policies), else layers calibrate lazily on their first CALIB_STEPS calls.
# --yes, or a stdin that is not a terminal, skips the confirmation. --scan-only stops after the listing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
py="$here/.venv/bin/python"
die() { echo "run_libero_quant_w4a8.sh: $*" >&2; exit 2; }
usage="usage: $0 SUITE [MODEL_PATH] [--policy gr00t|openvla|openvla-rsd] [--yes] [--port P] [--scan-only]"

suite="" model_path="" policy="gr00t" yes=0 port=5555 device="cpu" steps=8 calib="auto" scan_only=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --policy) [ $# -ge 2 ] || die "--policy needs a value"; policy="$2"; shift 2 ;;
    --policy=*) policy="${1#*=}"; shift ;;
    --yes|-y) yes=1; shift ;;
    --port) [ $# -ge 2 ] || die "--port needs a value"; port="$2"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --device) [ $# -ge 2 ] || die "--device needs a value"; device="$2"; shift 2 ;;
    --denoising-steps|--denoising_steps) [ $# -ge 2 ] || die "$1 needs a value"; steps="$2"; shift 2 ;;
    --calib-data) [ $# -ge 2 ] || die "--calib-data needs a value"; calib="$2"; shift 2 ;;
    --model-path|--model_path) [ $# -ge 2 ] || die "$1 needs a value"; model_path="$2"; shift 2 ;;
    --scan-only|--dry-run) scan_only=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -*) die "unknown option $1 ($usage)" ;;
    *) if [ -z "$suite" ]; then suite="$1"; elif [ -z "$model_path" ]; then model_path="$1";
       else die "unexpected argument $1 ($usage)"; fi; shift ;;
  esac
done
[ -n "$suite" ] || die "$usage"
case "$suite" in libero_spatial|libero_object|libero_goal|libero_10|libero_90) ;;
  *) die "unknown suite '$suite' (libero_spatial|libero_object|libero_goal|libero_10|libero_90)" ;; esac
case "$policy" in gr00t|openvla|openvla-rsd) ;; *) die "--policy must be gr00t, openvla or openvla-rsd (got '$policy')" ;; esac
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number (got '$port')"
[ -x "$py" ] || die "$here/.venv is missing; run scripts/setup.sh server first"

if [ -z "$model_path" ]; then
  case "$policy" in
    gr00t) model_path="artifacts/gr00t/$suite" ;;
    *) model_path="artifacts/${policy//-/_}/$suite" ;;
  esac
fi
if [ ! -d "$model_path" ]; then
  echo "run_libero_quant_w4a8.sh: model directory '$model_path' does not exist." >&2
  if [ "$policy" = gr00t ]; then
    echo "  train one:  .venv/bin/python -m models.gr00t.train --demos 'artifacts/demos/$suite/*.hdf5' --out $model_path" >&2
  fi
  echo "  or pass a released-format checkpoint directory as the second argument." >&2
  exit 2
fi
[ -f "$model_path/config.json" ] || die "'$model_path' has no config.json: not a released-format $policy checkpoint"

# Seed defaults; anything already exported wins. SCOPE="" (as the seed sets it) also turns DuQuant on.
export GR00T_DUQUANT_SCOPE="${GR00T_DUQUANT_SCOPE-}"
export GR00T_DUQUANT_WBITS_DEFAULT="${GR00T_DUQUANT_WBITS_DEFAULT:-4}"
export GR00T_DUQUANT_ABITS="${GR00T_DUQUANT_ABITS:-8}"
export GR00T_DUQUANT_BLOCK="${GR00T_DUQUANT_BLOCK:-16}"
export GR00T_DUQUANT_PERMUTE="${GR00T_DUQUANT_PERMUTE:-1}"
export GR00T_DUQUANT_ROW_ROT="${GR00T_DUQUANT_ROW_ROT:-restore}"
export GR00T_DUQUANT_ACT_PCT="${GR00T_DUQUANT_ACT_PCT:-99.9}"
export GR00T_DUQUANT_CALIB_STEPS="${GR00T_DUQUANT_CALIB_STEPS:-32}"
export GR00T_DUQUANT_LS="${GR00T_DUQUANT_LS:-0.15}"
export GR00T_DUQUANT_PACKDIR="${GR00T_DUQUANT_PACKDIR:-artifacts/duquant_packs/$policy}"
unset GR00T_DUQUANT_DRYRUN  # the server below must quantise, not list and exit

server_args=(--policy "$policy" --model-path "$model_path" --port "$port" --device "$device")
if [ "$policy" = gr00t ]; then
  server_args+=(--denoising-steps "$steps" --embodiment-tag new_embodiment)
fi
calib_note="lazy (first ${GR00T_DUQUANT_CALIB_STEPS} calls of each layer)"
if [ "$calib" = auto ]; then
  calib="artifacts/demos/$suite/*.hdf5"
  compgen -G "$calib" >/dev/null || calib="none"
fi
if [ "$calib" != none ]; then
  if [ "$policy" = openvla-rsd ]; then
    calib_note="lazy (calib_data is not wired for openvla-rsd yet)"
  else
    compgen -G "$calib" >/dev/null || die "--calib-data '$calib': no files match"
    server_args+=(--policy-option "calib_data=$calib" --policy-option "calib_n=$GR00T_DUQUANT_CALIB_STEPS")
    calib_note="$GR00T_DUQUANT_CALIB_STEPS demonstration observations from $calib"
  fi
fi
server_args+=("${extra[@]}")

echo "=============================================================="
echo " DuQuant W4A8 policy server for LIBERO ($suite)"
echo "=============================================================="
echo " policy            : $policy"
echo " model path        : $model_path"
echo " port              : $port   device: $device$([ "$policy" = gr00t ] && echo "   denoising steps: $steps")"
echo " calibration       : $calib_note"
echo " effective DuQuant configuration (GR00T_DUQUANT_*):"
env | grep '^GR00T_DUQUANT_' | sort | sed 's/^GR00T_DUQUANT_/   /'
echo "--------------------------------------------------------------"
echo " dry run: layers that will be quantised"
echo "--------------------------------------------------------------"
GR00T_DUQUANT_DRYRUN=1 "$py" -m quant.scan --policy "$policy" --model-path "$model_path"
echo "--------------------------------------------------------------"
if [ "$scan_only" = 1 ]; then
  echo "--scan-only: not starting the server"
  exit 0
fi
if [ "$yes" != 1 ] && [ -t 0 ]; then
  read -r -p "Start the quantised server on port $port? [y/N] " answer
  case "$answer" in y|Y|yes|YES) ;; *) echo "aborted"; exit 1 ;; esac
fi
echo "starting: ./run_inference_server.sh ${server_args[*]}"
echo "then run: ./run_libero_eval.sh $suite --headless --port $port"
exec ./run_inference_server.sh "${server_args[@]}"
