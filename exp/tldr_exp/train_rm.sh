#!/usr/bin/env bash
# TL;DR reward model on the human preference pairs.
#
#   bash exp/tldr_exp/train_rm.sh NAME INIT_PATH DATA_PATH [extra flags]
#
#   NAME INIT_PATH  e.g. pythia-2.8b /path/to/pythia-2.8b; writes models/NAME_tldr/rm
#   DATA_PATH       pref data, e.g. exp/tldr_exp/data/tldr
#   extra flags     override the defaults below (the original EXO code's, see README.md)
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,8p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; DATA_PATH=$3
shift 3
bash "$(dirname "$0")/../custom_exp/train_rm.sh" "${NAME}" "${INIT_PATH}" base tldr/pref "${DATA_PATH}" \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 650 \
    --max_gen_len 75 \
    --learning_rate 1e-5 \
    --num_train_epochs 1 \
    "$@"
