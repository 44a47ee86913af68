#!/usr/bin/env bash
# Anthropic-HH reward-model scoring of gen data: rw data for alignment, or the mean reward.
#
#   bash exp/hh_exp/inference_rm.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [label|eval] [extra flags]
#
#   DATA_PATH    gen data, e.g. exp/hh_exp/data/hh_sft; label writes exp/hh_exp/data/hh_rw/SPLIT.json
#   MODEL_PATH   the reward model, e.g. models/pythia-2.8b_hh/rm
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
    --max_seq_len 512 \
    --max_gen_len 200 \
    "$@"
