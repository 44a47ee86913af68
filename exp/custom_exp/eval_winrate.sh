#!/usr/bin/env bash
# Judged win rate of every decoded checkpoint of an alignment run against a baseline, and one
# markdown table of them (src/eval_winrate.py).
#
#   bash exp/custom_exp/eval_winrate.sh RESULTS_DIR BASELINE JUDGE [extra flags]
#
#   RESULTS_DIR  inference_align.sh output: RESULTS_DIR/ckptN/test.json
#   BASELINE     reference answers (a pref or sft dataset, with --baseline_kind) or gen data of a policy
#   JUDGE        rm:PATH, lm:PATH, openai:MODEL or fn:FILE.py:FUNCTION (see src/eval_winrate.py)
#   extra flags  passed on to src/eval_winrate.py (--judge_prompt, --baseline_kind, --judge_base_url, ...)
#
# Writes RESULTS_DIR/ckptN/winrate_KIND.json (KIND: the judge's kind, e.g. winrate_openai.json),
# its judgment cache beside it (a rerun asks nothing twice), and RESULTS_DIR/winrate_KIND.md.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    sed -n '2,14p' "$0"; exit 2
fi
RESULTS_DIR=${1%/}; BASELINE=$2; JUDGE=$3
shift 3
KIND=${JUDGE%%:*}
CKPTS=$(find "${RESULTS_DIR}" -maxdepth 1 -type d -regex '.*/ckpt[0-9]+' -printf '%f\n' | sort -V)
if [ -z "${CKPTS}" ]; then
    echo "error: ${RESULTS_DIR}: no ckptN directories; decode the run with inference_align.sh first" >&2
    exit 2
fi
TABLE="${RESULTS_DIR}/winrate_${KIND}.md"
ROWS=()
for CKPT in ${CKPTS}; do
    OUT="${RESULTS_DIR}/${CKPT}/winrate_${KIND}.json"
    python "$(dirname "$0")/../../src/eval_winrate.py" --policy "${RESULTS_DIR}/${CKPT}" --baseline "${BASELINE}" \
        --judge "${JUDGE}" --name "$(basename "${RESULTS_DIR}")/${CKPT}" --output_path "${OUT}" "$@"
    ROWS+=("$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["markdown_row"])' "${OUT}")")
done
HEADER=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["markdown_header"])' "${OUT}")
printf '%s\n' "${HEADER}" "${ROWS[@]}" > "${TABLE}.tmp" && mv "${TABLE}.tmp" "${TABLE}"
echo "wrote ${TABLE}"
cat "${TABLE}"
