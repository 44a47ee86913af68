#!/usr/bin/env bash
# TL;DR: decode every checkpoint ckptN of an alignment run on the test prompts.
#
#   bash exp/tldr_exp/inference_align.sh DEVICE_IDS RUN_DIR DATA_PATH [extra flags]
#
#   RUN_DIR      e.g. models/pythia-2.8b_tldr/align_exo-rw_nc2
#   DATA_PATH    the prompts, e.g. exp/tldr_exp/data/tldr (its test split is decoded)
#   extra flags  override the defaults below (see README.md)
#
# Writes gen data to DATA_PATH_infer_res/<run's parent>/<run>/ckptN/test.json, e.g.
# exp/tldr_exp/data/tldr_infer_res/pythia-2.8b_tldr/align_exo-rw_nc2/ckpt1/test.json.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,11p' "$0"; exit 2
fi
DEVICE_IDS=$1; RUN_DIR=${2%/}; DATA_PATH=${3%/}
shift 3
RESULTS="${DATA_PATH}_infer_res/$(basename "$(dirname "${RUN_DIR}")")/$(basename "${RUN_DIR}")"
bash "$(dirname "$0")/../custom_exp/inference_align.sh" "${DEVICE_IDS}" "${RUN_DIR}" "tldr/sft:${DATA_PATH}" "${RESULTS}" \
    --prompt_num 512 \
    --return_num 4 \
    --seed 42 \
    --temp 0.8 \
    --max_length 650 \
    --max_new_tokens 75 \
    --batch_size 16 \
    "$@"
