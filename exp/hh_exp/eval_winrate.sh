#!/usr/bin/env bash
# Anthropic-HH: judged win rate of every decoded checkpoint against the chosen answers
# (the human-preferred answer of each test prompt), position-debiased (src/eval_winrate.py).
#
#   bash exp/hh_exp/eval_winrate.sh RESULTS_DIR DATA_PATH JUDGE [extra flags]
#
#   RESULTS_DIR  inference_align.sh output, e.g. exp/hh_exp/data/hh_infer_res/pythia-2.8b_hh/align_exo-rw_nc2
#   DATA_PATH    the pref data the prompts came from, e.g. exp/hh_exp/data/hh (its test split's chosen answers)
#   JUDGE        openai:MODEL (the paper: GPT-4), rm:PATH (the recipe's reward model), lm:PATH
#   extra flags  override the defaults below (see README.md)
#
# Writes RESULTS_DIR/ckptN/winrate_KIND.json and the table RESULTS_DIR/winrate_KIND.md.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,13p' "$0"; exit 2
fi
RESULTS_DIR=$1; DATA_PATH=$2; JUDGE=$3
shift 3
bash "$(dirname "$0")/../custom_exp/eval_winrate.sh" "${RESULTS_DIR}" "${DATA_PATH}" "${JUDGE}" \
    --baseline_kind pref \
    --baseline_duplicates first \
    --judge_prompt "$(dirname "$0")/judge_prompt.txt" \
    --batch_size 16 \
    --max_seq_len 512 \
    --max_gen_len 200 \
    "$@"
