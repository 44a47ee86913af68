#!/usr/bin/env bash
# IMDB oracle scoring of gen data: pref data labelled by the oracle, or its mean reward.
#
#   bash exp/imdb_exp/inference_class.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [label_pref|eval] [extra flags]
#
#   DATA_PATH    gen data, e.g. data/imdb_prefix10_sft (SFT samples) or a decoded checkpoint
#   SPLIT        train | test
#   MODEL_PATH   the oracle, e.g. models/gpt2-large_imdb/class
#   label_pref   (default) pref data in DATA_PATH minus _sft plus _pref/SPLIT.json:
#                chosen = highest oracle log-odds, rejected = lowest
#   eval         mean and std of the oracle log-odds in DATA_PATH/SPLIT_oracle_eval.json
#   extra flags  passed on to src/inference_class.py and override the defaults below
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,12p' "$0"; exit 2
fi
DEVICE_IDS=$1; DATA_PATH=$2; SPLIT=$3; MODEL_PATH=$4
shift 4
MODE=label_pref
if [ "$#" -gt 0 ] && { [ "$1" = label_pref ] || [ "$1" = eval ]; }; then
    MODE=$1; shift
fi
source "$(dirname "$0")/../custom_exp/common.sh"

launch "${DATA_PATH%/}/inference_class_${MODE}_${SPLIT}.log" inference_class.py \
    --model_name_or_path "${MODEL_PATH}" \
    --data_path "${DATA_PATH}" \
    --split "${SPLIT}" \
    --mode "${MODE}" \
    --batch_size 64 \
    --max_seq_len 512 \
    --max_gen_len 500 \
    --dtype "${DTYPE}" \
    "$@"
