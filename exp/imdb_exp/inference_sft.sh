#!/usr/bin/env bash
# IMDB sampling: K completions of every prompt of a split from the SFT model (gen data).
#
#   bash exp/imdb_exp/inference_sft.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [extra flags]
#
#   DATA_PATH    the imdb_prefix10 directory; writes DATA_PATH_sft/SPLIT.json
#   SPLIT        train | test
#   MODEL_PATH   the SFT model, e.g. models/gpt2-large_imdb/sft
#   extra flags  override the defaults below (see README.md for where they come from)
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,9p' "$0"; exit 2
fi
DEVICE_IDS=$1; DATA_PATH=$2; SPLIT=$3; MODEL_PATH=$4
shift 4
bash "$(dirname "$0")/../custom_exp/inference_sft.sh" "${DEVICE_IDS}" "imdb/sft:${DATA_PATH}" "${SPLIT}" "${MODEL_PATH}" \
    --return_num 4 \
    --temp 0.8 \
    --max_new_tokens 500 \
    --max_length 512 \
    --batch_size 64 \
    "$@"
