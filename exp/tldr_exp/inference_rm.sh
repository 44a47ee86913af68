#!/usr/bin/env bash
# TL;DR reward-model scoring of gen data: rw data for alignment, or the mean reward.
#
#   bash exp/tldr_exp/inference_rm.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [label|eval] [extra flags]
#
#   DATA_PATH    gen data, e.g. exp/tldr_exp/data/tldr_sft; label writes exp/tldr_exp/data/tldr_rw/SPLIT.json
#   MODEL_PATH   the reward model, e.g. models/pythia-2.8b_tldr/rm
#   extra flags  override the defaults below (see README.md)
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,8p' "$0"; exit 2
fi
POSITIONAL=("$1" "$2" "$3" "$4")
shift 4
if [ "$#" -gt 0 ] && { [ "$1" = label ] || [ "$1" = eval ]; }; then
    POSITIONAL+=("$1"); shift
fi
bash "$(dirname "$0")/../custom_exp/inference_rm.sh" "${POSITIONAL[@]}" \
    --batch_size 64 \
    --max_seq_len 650 \
    --max_gen_len 75 \
    "$@"
