#!/usr/bin/env bash
# Align a model with EXO or DPO on rw (or pref) data.
#
#   bash exp/custom_exp/train_exo.sh NAME INIT_PATH MODEL_TYPE DATA_NAME DATA_PATH LOSS_TYPE NUM_CONTRASTIVE [extra flags]
#
#   NAME             short name of the base model, e.g. gpt2-large (names the output directory)
#   INIT_PATH        model to start from and to use as the frozen reference (usually the SFT model)
#   MODEL_TYPE       label of INIT_PATH, e.g. sft; names the TensorBoard run
#   DATA_NAME        NAME/KIND of the data, e.g. imdb/rw
#   DATA_PATH        directory with train.json[l] and test.json[l]
#   LOSS_TYPE        exo-pref | exo-rw | dpo-pref | dpo-rw, or a listwise baseline:
#                    dpo-pl | nca-rw | nca-pref | lipo | ipo | simpo (README: Every loss type)
#   NUM_CONTRASTIVE  K, candidates per group
#   extra flags      passed on to src/train_exo.py and override the defaults below
#
#   EXO_PREF_LOG_EPS=-10  (environment) for exo-pref, the original EXO code's target: log eps of
#                    every loser on an unnormalised target, passed as the normalised
#                    --pref_epsilon (K-1) e^L / (1 + (K-1) e^L), sigmoid(-10) at K = 2
#
# Writes HF checkpoints to models/NAME_DATA/align_LOSS_ncK/ckpt1..N (and the final model in
# that directory). Devices: DEVICE_IDS (see common.sh); CPU ranks when there is no GPU.
set -euo pipefail
if [ "$#" -lt 7 ]; then
    sed -n '2,21p' "$0"; exit 2
fi
NAME=$1; INIT_PATH=$2; MODEL_TYPE=$3; DATA_NAME=$4; DATA_PATH=$5; LOSS_TYPE=$6; NUM_CONTRASTIVE=$7
shift 7
source "$(dirname "$0")/common.sh"

DATA_ABBR="${DATA_NAME%%/*}"
EPSILON=()
if [ -n "${EXO_PREF_LOG_EPS:-}" ] && [ "${LOSS_TYPE}" = exo-pref ]; then
    EPSILON=(--pref_epsilon "$(python -c 'import math, sys; k, log_eps = int(sys.argv[1]), float(sys.argv[2]); '\
'print(repr((k - 1) * math.exp(log_eps) / (1 + (k - 1) * math.exp(log_eps))))' "${NUM_CONTRASTIVE}" "${EXO_PREF_LOG_EPS}")")
fi
run_training train_exo.py "${NAME}_${DATA_ABBR}/align_${LOSS_TYPE}_nc${NUM_CONTRASTIVE}" "${MODEL_TYPE}" \
    --model_name_or_path "${INIT_PATH}" \
    --ref_name_or_path "${INIT_PATH}" \
    --data_name_path "${DATA_NAME}:${DATA_PATH}" \
    --loss_type "${LOSS_TYPE}" \
    --num_contrastive "${NUM_CONTRASTIVE}" \
    --beta_r 0.5 \
    --beta_pi 0.5 \
    --temp 0.8 \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --max_seq_len 512 \
    --max_gen_len 200 \
    --learning_rate 1e-6 \
    --weight_decay 0 \
    --num_warmup_steps 0 \
    --lr_scheduler_type constant \
    --num_train_epochs 1 \
    --max_iter_step 1400 \
    --num_save_checkpoint 10 \
    --zero_stage 2 \
    --gradient_checkpointing \
    ${EPSILON[@]+"${EPSILON[@]}"} \
    "$@"
