#!/usr/bin/env bash
# IMDB: decode every checkpoint ckptN of an alignment run on the test prompts.
#
#   bash exp/imdb_exp/inference_align.sh DEVICE_IDS RUN_DIR DATA_PATH [extra flags]
#
#   RUN_DIR      e.g. models/gpt2-large_imdb/align_exo-rw_nc2
#   DATA_PATH    the imdb_prefix10 directory (its test prompts are decoded)
#   extra flags  override the defaults below (see README.md)
#
# Writes gen data to DATA_PATH_infer_res/<run's parent>/<run>/ckptN/test.json, e.g.
# data/imdb_prefix10_infer_res/gpt2-large_imdb/align_exo-rw_nc2/ckpt1/test.json.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,11p' "$0"; exit 2
fi
DEVICE_IDS=$1; RUN_DIR=${2%/}; DATA_PATH=${3%/}
shift 3
RESULTS="${DATA_PATH}_infer_res/$(basename "$(dirname "${RUN_DIR}")")/$(basename "${RUN_DIR}")"
bash "$(dirname "$0")/../custom_exp/inference_align.sh" "${DEVICE_IDS}" "${RUN_DIR}" "imdb/sft:${DATA_PATH}" "${RESULTS}" \
    --prompt_num 512 \
    --return_num 4 \
    --seed 42 \
    --temp 0.8 \
    --max_length 512 \
    --max_new_tokens 500 \
    --batch_size 32 \
    "$@"
