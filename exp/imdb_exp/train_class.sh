#!/usr/bin/env bash
# IMDB oracle: a sentiment classifier (one logit = log-odds of positive) on imdb_class.
#
#   bash exp/imdb_exp/train_class.sh NAME INIT_PATH DATA_PATH [extra flags]
#
#   NAME         short name of the base model, e.g. gpt2-large (names the output directory)
#   INIT_PATH    pretrained model to start from (the paper: gpt2-large)
#   DATA_PATH    the imdb_class directory written by preproc.py
#   extra flags  passed on to src/train_class.py and override the defaults below
#
# Writes the HF classifier to models/NAME_imdb/class (OUTPUT_ROOT replaces models/).
# Defaults: the original EXO code's exp/imdb_exp/train_class.sh (see README.md).
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,12p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; DATA_PATH=$3
shift 3
source "$(dirname "$0")/../custom_exp/common.sh"

run_training train_class.py "${NAME}_imdb/class" base \
    --model_name_or_path "${INIT_PATH}" \
    --data_name_path "imdb/class:${DATA_PATH}" \
    --per_device_train_batch_size 32 \
    --per_device_eval_batch_size 32 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 512 \
    --learning_rate 1e-5 \
    --weight_decay 0 \
    --num_warmup_steps 0 \
    --lr_scheduler_type cosine \
    --num_train_epochs 5 \
    --zero_stage 2 \
    --gradient_checkpointing \
    "$@"
