#!/usr/bin/env bash
# IMDB: log-probs of decoded samples under a model (the policy that drew them, or the SFT
# model), for the KL(policy || SFT) estimate of the frontier.
#
#   bash exp/imdb_exp/calc_logprobs.sh DEVICE_IDS SAMPLES_DIR MODEL_PATH LABEL [extra flags]
#
#   SAMPLES_DIR  a decoded checkpoint, e.g. data/imdb_prefix10_infer_res/gpt2-large_imdb/align_exo-rw_nc2/ckpt1
#   MODEL_PATH   the model to score with
#   LABEL        names the output SAMPLES_DIR/logps_LABEL.json, e.g. policy or sft
#   extra flags  passed on to src/calc_logprobs.py and override the defaults below
#
# Scored at the sampling temperature, with room for the EOS after the longest completion
# (--max_gen_len above inference_align's --max_new_tokens), so the log-probs are those of
# the distribution the samples were drawn from.
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,14p' "$0"; exit 2
fi
DEVICE_IDS=$1; SAMPLES_DIR=${2%/}; MODEL_PATH=$3; LABEL=$4
shift 4
source "$(dirname "$0")/../custom_exp/common.sh"

launch "${SAMPLES_DIR}/calc_logprobs_${LABEL}.log" calc_logprobs.py \
    --model_name_or_path "${MODEL_PATH}" \
    --data_path "${SAMPLES_DIR}" \
    --split test \
    --temp 0.8 \
    --max_seq_len 512 \
    --max_gen_len 501 \
    --batch_size 32 \
    --dtype "${DTYPE}" \
    --output_path "${SAMPLES_DIR}/logps_${LABEL}.json" \
    "$@"
