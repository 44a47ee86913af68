#!/usr/bin/env bash
# Supervised fine-tuning: maximum likelihood of the chosen completions of sft (or pref) data.
#
#   bash exp/custom_exp/train_sft.sh NAME INIT_PATH MODEL_TYPE DATA_NAME DATA_PATH [extra flags]
#
#   NAME         short name of the base model, e.g. gpt2-large (names the output directory)
#   INIT_PATH    model to start from (a pretrained causal LM)
#   MODEL_TYPE   label of INIT_PATH, e.g. base; names the TensorBoard run
#   DATA_NAME    NAME/KIND of the data, e.g. imdb/sft (pref data trains on prompt + chosen)
#   DATA_PATH    directory with train.json[l] and test.json[l]
#   extra flags  passed on to src/train_sft.py and override the defaults below
#
# Writes the HF model to models/NAME_DATA/sft (OUTPUT_ROOT replaces models/). Devices:
# DEVICE_IDS (see common.sh); CPU ranks when there is no GPU.
set -euo pipefail
if [ "$#" -lt 5 ]; then
    sed -n '2,14p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; MODEL_TYPE=$3; DATA_NAME=$4; DATA_PATH=$5
shift 5
source "$(dirname "$0")/common.sh"

DATA_ABBR="${DATA_NAME%%/*}"
run_training train_sft.py "${NAME}_${DATA_ABBR}/sft" "${MODEL_TYPE}" \
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
