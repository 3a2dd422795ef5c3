#!/usr/bin/env bash
# Supervised fine-tuning of the unified LM with the DeepSpeed launcher: pretrain.sh with stage=sft.
#
#   training/sft.sh CONFIG [key=value ...]
#   training/sft.sh training/tiny_sft.yaml init_from=runs/tiny_pretrain/final data.code_shards=runs/qs/codes
#
# Same environment as pretrain.sh (NUM_GPUS, HOSTFILE, MASTER_ADDR, MASTER_PORT, DS_LAUNCH_ARGS, PYTHON).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  [ $# -ge 1 ] && exit 0 || exit 2
fi
exec bash "$HERE/pretrain.sh" "$@" stage=sft
