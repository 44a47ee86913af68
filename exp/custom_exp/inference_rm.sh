#!/usr/bin/env bash
# Score sampled completions with a reward model: rw data for alignment, or a reward summary.
#
#   bash exp/custom_exp/inference_rm.sh DEVICE_IDS DATA_PATH SPLIT MODEL_PATH [label|eval] [extra flags]
#
#   DEVICE_IDS   GPUs to use, e.g. 0,1,2,3; without a GPU, one CPU rank per listed id
#   DATA_PATH    gen data directory (inference_sft.sh output), e.g. data/imdb_sft
#   SPLIT        train | test
#   MODEL_PATH   the reward model
#   label|eval   label (default): rw data {prompt, completions, rewards} in DATA_PATH minus _sft
#                plus _rw, e.g. data/imdb_rw/SPLIT.json; eval: mean and std of the rewards in
#                DATA_PATH/SPLIT_reward_eval.json
#   extra flags  passed on to src/inference_rm.py and override the defaults below
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,13p' "$0"; exit 2
fi
DEVICE_IDS=$1; DATA_PATH=$2; SPLIT=$3; MODEL_PATH=$4
shift 4
MODE=label
if [ "$#" -gt 0 ] && { [ "$1" = label ] || [ "$1" = eval ]; }; then
    MODE=$1; shift
fi
source "$(dirname "$0")/common.sh"

launch "${DATA_PATH%/}/inference_rm_${MODE}_${SPLIT}.log" inference_rm.py \
    --model_name_or_path "${MODEL_PATH}" \
    --data_path "${DATA_PATH}" \
    --split "${SPLIT}" \
    --mode "${MODE}" \
    --batch_size 8 \
    --max_seq_len 512 \
    --max_gen_len 256 \
    --dtype "${DTYPE}" \
    "$@"
