#!/usr/bin/env bash
# Decode every checkpoint ckptN of an alignment run on a dataset's prompts (inputs to reward,
# KL and win-rate evaluation).
#
#   bash exp/custom_exp/inference_align.sh DEVICE_IDS RUN_DIR NAME:PATH RESULTS_DIR [extra flags]
#
#   DEVICE_IDS   GPUs to use, e.g. 0,1,2,3; without a GPU, one CPU rank per listed id
#   RUN_DIR      an alignment run, e.g. models/gpt2-large_imdb/align_exo-rw_nc2 (holds ckpt1..N)
#   NAME:PATH    the prompts, as --data_name_path NAME/KIND:PATH, e.g. imdb/sft:data/imdb_prefix10
#   RESULTS_DIR  gen data of checkpoint N goes to RESULTS_DIR/ckptN/test.json
#   extra flags  passed on to inference_sft.sh (and src/inference_sft.py)
#
# Decodes the test split's prompts.
#
# Checkpoints are decoded in order of N; one that is already decoded is kept (inference_sft
# resumes from its shards, and a finished ckptN/test.json is skipped).
set -euo pipefail
if [ "$#" -lt 4 ]; then
    sed -n '2,16p' "$0"; exit 2
fi
DEVICE_IDS=$1; RUN_DIR=${2%/}; DATA_NAME_PATH=$3; RESULTS_DIR=${4%/}
shift 4

CKPTS=$(find "${RUN_DIR}" -maxdepth 1 -type d -regex '.*/ckpt[0-9]+' -printf '%f\n' | sort -V)
if [ -z "${CKPTS}" ]; then
    echo "error: ${RUN_DIR}: no ckptN directories; train with --num_save_checkpoint or --save_step_interval" >&2
    exit 2
fi
for CKPT in ${CKPTS}; do
    if [ -f "${RESULTS_DIR}/${CKPT}/test.json" ]; then
        echo "${RESULTS_DIR}/${CKPT}/test.json exists; skipping ${CKPT}"
        continue
    fi
    bash "$(dirname "$0")/inference_sft.sh" "${DEVICE_IDS}" "${DATA_NAME_PATH}" test "${RUN_DIR}/${CKPT}" \
        --output_path "${RESULTS_DIR}/${CKPT}" "$@"
done
