#!/usr/bin/env bash
# Anthropic-HH alignment: EXO or DPO from the SFT model on rw data (reward-model or converted pref data).
#
#   bash exp/hh_exp/train_exo.sh NAME INIT_PATH DATA_PATH LOSS_TYPE NUM_CONTRASTIVE [extra flags]
#
#   NAME INIT_PATH   e.g. pythia-2.8b models/pythia-2.8b_hh/sft (also the frozen reference)
#   DATA_PATH        rw data: exp/hh_exp/data/hh_rw or exp/hh_exp/data/hh_p2r
#   LOSS_TYPE        exo-pref | exo-rw | dpo-pref | dpo-rw, or a listwise baseline:
#                    dpo-pl | nca-rw | nca-pref | lipo | ipo | simpo (README: Every loss type)
#   NUM_CONTRASTIVE  K, candidates per group (at most the completions per prompt)
#   extra flags      override the defaults below (the original EXO code's, see README.md)
#
# Writes models/NAME_hh/align_LOSS_ncK/ckpt1..20 and the final model.
set -euo pipefail
if [ "$#" -lt 5 ]; then
    sed -n '2,13p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; DATA_PATH=$3; LOSS_TYPE=$4; NUM_CONTRASTIVE=$5
shift 5
# exo-pref with the original EXO code's target, log eps = -10 (docs/objective.md)
EXO_PREF_LOG_EPS=-10 bash "$(dirname "$0")/../custom_exp/train_exo.sh" "${NAME}" "${INIT_PATH}" sft hh/rw "${DATA_PATH}" \
    "${LOSS_TYPE}" "${NUM_CONTRASTIVE}" \
    --beta_r 0.5 \
    --beta_pi 0.5 \
    --temp 0.8 \
    --per_device_train_batch_size 8 \
    --per_device_eval_batch_size 8 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 512 \
    --max_gen_len 200 \
    --learning_rate 1e-6 \
    --max_iter_step 700 \
    --num_save_checkpoint 20 \
    "$@"
