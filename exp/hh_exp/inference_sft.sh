#!/usr/bin/env bash
# Anthropic-HH sampling: completions of every prompt of a split from the SFT model (gen data).
#
#   bash exp/hh_exp/inference_sft.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [extra flags]
#
#   DATA_PATH    the prompts (any kind with a prompt), e.g. exp/hh_exp/data/hh;
#                writes DATA_PATH_sft/SPLIT.json
#   SPLIT        train | test
#   MODEL_PATH   the SFT model, e.g. models/pythia-2.8b_hh/sft
#   extra flags  override the defaults below (see README.md)
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,10p' "$0"; exit 2
fi
DEVICE_IDS=$1; DATA_PATH=$2; SPLIT=$3; MODEL_PATH=$4
shift 4
bash "$(dirname "$0")/../custom_exp/inference_sft.sh" "${DEVICE_IDS}" "hh/sft:${DATA_PATH}" "${SPLIT}" "${MODEL_PATH}" \
    --return_num 2 \
    --temp 0.8 \
    --max_new_tokens 200 \
    --max_length 512 \
    --batch_size 32 \
    "$@"
