# Sourced by the launchers in this directory: the deepspeed command for this machine.
#
#   DEVICE_IDS=0,1,2,3   GPUs to use (default: every visible GPU). Without a GPU the same
#                        code runs on CPU ranks, one per listed id (default 2 ranks; a
#                        single CPU rank runs as plain `python`).
#   MASTER_PORT=29500    rendezvous port (default: a free one, so runs can share a node)
#
# Sets DEEPSPEED (an array: the launcher with its device flags), ON_GPU (1/0) and DTYPE
# (bf16 on GPUs, fp32 on CPU ranks, unless DTYPE is already set).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NUM_GPUS="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
MASTER_PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

if [ "${NUM_GPUS}" -gt 0 ]; then
    ON_GPU=1
    DEVICE_IDS="${DEVICE_IDS:-$(seq -s, 0 $((NUM_GPUS - 1)))}"
    DEEPSPEED=(deepspeed --include "localhost:${DEVICE_IDS}" --master_port "${MASTER_PORT}")
    DTYPE="${DTYPE:-bf16}"
else
    ON_GPU=0
    DEVICE_IDS="${DEVICE_IDS:-0,1}"
    NUM_CPU_RANKS="$(echo "${DEVICE_IDS}" | tr ',' '\n' | grep -c .)"
    if [ "${NUM_CPU_RANKS}" -eq 1 ]; then
        # One CPU rank needs no launcher: every script makes its own one-process group, and
        # the launcher's extra interpreter start costs ~10 s per stage on a laptop.
        DEEPSPEED=(python)
    else
        DEEPSPEED=(deepspeed --num_gpus "${NUM_CPU_RANKS}" --master_port "${MASTER_PORT}")
    fi
    DTYPE="${DTYPE:-fp32}"
fi

# run_training SCRIPT RUN MODEL_TYPE [flags...]: launch src/SCRIPT for a training stage, writing
# to ${OUTPUT_ROOT:-models}/RUN with TensorBoard logs in ${TB_ROOT:-tb_logs} and the console
# copied to RUN/training.log. Flags later on the line win, so a launcher passes its defaults
# first and the user's extra flags last.
run_training() {
    local script=$1 run=$2 model_type=$3
    shift 3
    local output="${OUTPUT_ROOT:-models}/${run}"
    mkdir -p "${output}"
    "${DEEPSPEED[@]}" "${REPO_ROOT}/src/${script}" \
        --output_dir "${output}" \
        --enable_tensorboard \
        --tensorboard_name_path "${run//\//_}_${model_type}:${TB_ROOT:-tb_logs}" \
        --print_loss \
        --dtype "${DTYPE}" \
        "$@" 2>&1 | tee -a "${output}/training.log"
}
