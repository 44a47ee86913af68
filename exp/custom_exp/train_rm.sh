#!/usr/bin/env bash
# Reward model: a one-label sequence classifier trained on preference pairs (pref data).
#
#   bash exp/custom_exp/train_rm.sh NAME INIT_PATH MODEL_TYPE DATA_NAME DATA_PATH [extra flags]
#
#   NAME         short name of the base model, e.g. gpt2-large (names the output directory)
#   INIT_PATH    model to start from (usually the SFT model); the score head starts fresh
#   MODEL_TYPE   label of INIT_PATH, e.g. sft; names the TensorBoard run
#   DATA_NAME    NAME/KIND of the data, e.g. hh/pref
#   DATA_PATH    directory with train.json[l] and test.json[l]
#   extra flags  passed on to src/train_rm.py and override the defaults below
#
# Writes the HF model to models/NAME_DATA/rm (OUTPUT_ROOT replaces models/). Devices:
# DEVICE_IDS (see common.sh); CPU ranks when there is no GPU.
set -euo pipefail
if [ "$#" -lt 5 ]; then
    sed -n '2,14p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; MODEL_TYPE=$3; DATA_NAME=$4; DATA_PATH=$5
shift 5
source "$(dirname "$0")/common.sh"

DATA_ABBR="${DATA_NAME%%/*}"
run_training train_rm.py "${NAME}_${DATA_ABBR}/rm" "${MODEL_TYPE}" \
    --model_name_or_path "${INIT_PATH}" \
    --data_name_path "${DATA_NAME}:${DATA_PATH}" \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 512 \
    --max_gen_len 200 \
    --learning_rate 1e-5 \
    --weight_decay 0 \
    --num_warmup_steps 0 \
    --lr_scheduler_type cosine \
    --num_train_epochs 1 \
    --zero_stage 2 \
    --gradient_checkpointing \
    "$@"
