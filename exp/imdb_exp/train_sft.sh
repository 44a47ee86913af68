#!/usr/bin/env bash
# IMDB SFT: complete a review from its first 10 tokens (imdb_prefix10).
#
#   bash exp/imdb_exp/train_sft.sh NAME INIT_PATH DATA_PATH [extra flags]
#
#   NAME INIT_PATH  e.g. gpt2-large /path/to/gpt2-large; writes models/NAME_imdb/sft
#   DATA_PATH       the imdb_prefix10 directory written by preproc.py
#   extra flags     override the defaults below (the original EXO code's, see README.md)
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,8p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; DATA_PATH=$3
shift 3
bash "$(dirname "$0")/../custom_exp/train_sft.sh" "${NAME}" "${INIT_PATH}" base imdb/sft "${DATA_PATH}" \
    --per_device_train_batch_size 16 \
    --per_device_eval_batch_size 16 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 512 \
    --max_gen_len 500 \
    --learning_rate 1e-5 \
    --num_train_epochs 5 \
    "$@"
