#!/usr/bin/env bash
# IMDB reward-model scoring of gen data: rw data for alignment, or the mean reward.
#
#   bash exp/imdb_exp/inference_rm.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [label|eval] [extra flags]
#
#   DATA_PATH    gen data, e.g. data/imdb_prefix10_sft; label writes data/imdb_prefix10_rw/SPLIT.json
#   MODEL_PATH   the reward model, e.g. models/gpt2-large_imdb/rm
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
    --max_gen_len 500 \
    "$@"
