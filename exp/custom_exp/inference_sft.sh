#!/usr/bin/env bash
# Sample completions of a dataset's prompts from a model (gen data for reward labelling).
#
#   bash exp/custom_exp/inference_sft.sh DEVICE_IDS NAME:PATH SPLIT MODEL_PATH [extra flags]
#
#   DEVICE_IDS   GPUs to use, e.g. 0,1,2,3; without a GPU, one CPU rank per listed id
#   NAME:PATH    the prompts, as --data_name_path NAME/KIND:PATH, e.g. imdb/sft:data/imdb
#   SPLIT        train | test
#   MODEL_PATH   the model to sample from (usually the SFT model)
#   extra flags  passed on to src/inference_sft.py and override the defaults below
#
# Writes gen data {prompt, completions} to PATH_sft/SPLIT.json, e.g. data/imdb_sft/train.json
# and its log to PATH_sft/inference_sft_SPLIT.log (--output_path DIR moves the data, not the log).
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,13p' "$0"; exit 2
fi
DEVICE_IDS=$1; DATA_NAME_PATH=$2; SPLIT=$3; MODEL_PATH=$4
shift 4
source "$(dirname "$0")/common.sh"

OUTPUT="${DATA_NAME_PATH#*:}"
OUTPUT="${OUTPUT%/}_sft"
mkdir -p "${OUTPUT}"

launch "${OUTPUT}/inference_sft_${SPLIT}.log" inference_sft.py \
    --model_name_or_path "${MODEL_PATH}" \
    --data_name_path "${DATA_NAME_PATH}" \
    --split "${SPLIT}" \
    --return_num 4 \
    --temp 0.8 \
    --top_k 0 \
    --top_p 1.0 \
    --max_new_tokens 200 \
    --max_length 512 \
    --batch_size 8 \
    --seed 1234 \
    --dtype "${DTYPE}" \
    --output_path "${OUTPUT}" \
    "$@"
