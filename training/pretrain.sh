#!/usr/bin/env bash
# Pretrain the unified LM with the DeepSpeed launcher, from any working directory.
#
#   training/pretrain.sh CONFIG [key=value ...]
#   training/pretrain.sh training/tiny_pretrain.yaml data.code_shards=runs/qs/codes steps=200
#
# Environment:
#   NUM_GPUS        ranks per node (default 1; CPU processes when no GPU is visible)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" per line) for multi-node runs
#   MASTER_ADDR     rendezvous host for multi-node runs
#   MASTER_PORT     rendezvous port (default: a free port, so parallel runs do not collide)
#   DS_ACCELERATOR  set to cpu automatically when torch sees no CUDA device
#   DS_LAUNCH_ARGS  extra launcher arguments, e.g. "--include host1:0,1"
#   PYTHON          interpreter (default: the repository's .venv, else python3)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# An absolute config path, so ranks on other nodes (started in this same directory) find it too.
CONFIG="$1"; shift
if [ -f "$CONFIG" ]; then CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"; fi

if [ -z "${DS_ACCELERATOR:-}" ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

LAUNCH=(--master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  LAUNCH+=(--hostfile "$HOSTFILE")
  if [ -n "${MASTER_ADDR:-}" ]; then LAUNCH+=(--master_addr "$MASTER_ADDR"); fi
else
  LAUNCH+=(--num_gpus "${NUM_GPUS:-1}")
fi
# shellcheck disable=SC2206  # DS_LAUNCH_ARGS is meant to be word-split
EXTRA=(${DS_LAUNCH_ARGS:-})

exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" "${EXTRA[@]}" --no_local_rank --module \
  mmgen.training.pretrain "$CONFIG" "$@"
