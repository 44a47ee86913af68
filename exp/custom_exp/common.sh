# Sourced by the launchers in this directory: the launch command for this machine (or these
# machines) and `launch`, which runs a stage under it.
#
#   DEVICE_IDS=0,1,2,3   GPUs to use on each node (default: every visible GPU). Without a GPU
#                        the same code runs on CPU ranks, one per listed id (default 2 ranks;
#                        a single CPU rank runs as plain `python`).
#   MASTER_PORT=29500    rendezvous port (default: a free one, so runs can share a node; set it
#                        when NODE_RANK is set: every node must use the same)
#
# Several nodes (docs/multinode.md); the positional arguments stay as they are:
#   HOSTFILE=path        `deepspeed --hostfile path` from this node, which starts every node's
#                        ranks over ssh (pdsh), every slot of every host listed
#   NNODES=N NODE_RANK=R MASTER_ADDR=host
#                        run this node's share of an N-node job and meet the others at
#                        MASTER_ADDR (node 0): with `torchrun` (LAUNCHER=torchrun, the default
#                        here) or, with HOSTFILE naming the nodes, the deepspeed launcher
#                        without ssh (LAUNCHER=deepspeed). exp/slurm/launch.sbatch sets these.
#
# Sets DEEPSPEED (an array: the launcher with its device flags), ON_GPU (1/0) and DTYPE
# (bf16 on GPUs, fp32 on CPU ranks, unless DTYPE is already set).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NUM_GPUS="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
MASTER_PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

if [ "${NUM_GPUS}" -gt 0 ]; then
    ON_GPU=1
    DEVICE_IDS="${DEVICE_IDS:-$(seq -s, 0 $((NUM_GPUS - 1)))}"
    DTYPE="${DTYPE:-bf16}"
else
    ON_GPU=0
    DEVICE_IDS="${DEVICE_IDS:-0,1}"
    DTYPE="${DTYPE:-fp32}"
fi
RANKS_PER_NODE="$(echo "${DEVICE_IDS}" | tr ',' '\n' | grep -c .)"

if [ -n "${NODE_RANK:-}" ] && [ "${LAUNCHER:-torchrun}" = torchrun ]; then
    [ "${ON_GPU}" -eq 1 ] && export CUDA_VISIBLE_DEVICES="${DEVICE_IDS}"
    DEEPSPEED=(torchrun --nnodes "${NNODES:?NNODES must be set with NODE_RANK}" --node_rank "${NODE_RANK}"
               --nproc_per_node "${RANKS_PER_NODE}" --master_addr "${MASTER_ADDR:?MASTER_ADDR must be set with NODE_RANK}"
               --master_port "${MASTER_PORT}")
elif [ -n "${NODE_RANK:-}" ]; then
    DEEPSPEED=(deepspeed --hostfile "${HOSTFILE:?HOSTFILE must name the nodes with LAUNCHER=deepspeed}" --no_ssh
               --node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR:?MASTER_ADDR must be set with NODE_RANK}"
               --master_port "${MASTER_PORT}")
elif [ -n "${HOSTFILE:-}" ]; then
    DEEPSPEED=(deepspeed --hostfile "${HOSTFILE}" --master_port "${MASTER_PORT}" ${MASTER_ADDR:+--master_addr "${MASTER_ADDR}"})
elif [ "${ON_GPU}" -eq 1 ]; then
    DEEPSPEED=(deepspeed --include "localhost:${DEVICE_IDS}" --master_port "${MASTER_PORT}")
elif [ "${RANKS_PER_NODE}" -eq 1 ]; then
    # One CPU rank needs no launcher: every script makes its own one-process group, and
    # the launcher's extra interpreter start costs ~10 s per stage on a laptop.
    DEEPSPEED=(python)
else
    DEEPSPEED=(deepspeed --num_gpus "${RANKS_PER_NODE}" --master_port "${MASTER_PORT}")
fi

# launch LOG SCRIPT [flags...]: run src/SCRIPT under the launcher, the console copied to LOG
# (appended; only on node 0, and only once the stage has made LOG's directory: a run stopped by
# bad input leaves no directory). Returns the launcher's exit code.
#
# Preemption: the launcher and its ranks run in a process group of their own, watched by this
# script. SIGTERM, SIGINT or SIGHUP to this script, or the launcher itself dying of a signal,
# becomes SIGTERM to the ranks, which finish their step, checkpoint and exit 0 - so a scheduler
# may signal any process of the job. (With HOSTFILE the signal goes to the deepspeed launcher,
# which passes it to every node's ranks.)
launch() {
    local log=$1 script=$2
    shift 2
    if [ "${NODE_RANK:-0}" != 0 ]; then
        log=/dev/null/not-node-0  # a directory that never exists: this node's console is not copied
    fi
    local copier group status out
    # The copier is no part of the job: `wait` on a pipeline would wait for all of it.
    exec {out}> >(python -u "${REPO_ROOT}/exp/custom_exp/copy_log.py" "${log}")
    copier=$!
    set -m  # the job below gets a process group of its own
    "${DEEPSPEED[@]}" "${REPO_ROOT}/src/${script}" "$@" >&"${out}" 2>&1 &
    group=$!
    set +m
    exec {out}>&-
    trap 'stop_ranks "${group}" "${script}"' TERM INT HUP
    while true; do
        status=0
        wait "${group}" || status=$?
        # wait returns early (>128) when a trapped signal arrives; the launcher is still there then
        kill -0 "${group}" 2>/dev/null || break
    done
    if [ "${status}" -gt 128 ]; then
        stop_ranks "${group}" "${script}"  # the launcher was killed, its ranks may run on: stop them as above
    fi
    # ends when the last rank closes its output; a trapped signal interrupts wait, so wait again
    # while the copier lives (a copier that died of a signal must not spin `until wait` forever)
    while kill -0 "${copier}" 2>/dev/null; do wait "${copier}" || :; done
    trap - TERM INT HUP
    return "${status}"
}

# stop_ranks GROUP SCRIPT: SIGTERM to the ranks of SCRIPT in process group GROUP, not to the
# launchers between them and this script. Ranks started over ssh (HOSTFILE) are elsewhere: then
# the deepspeed launcher, the group's leader, is signalled and passes it on.
stop_ranks() {
    local ranks
    ranks="$(ps -ww -e -o pgid=,pid=,args= | awk -v group="$1" -v script="src/$2" \
        '$1 == group && index($0, script) && !/deepspeed\.launcher|bin\/deepspeed|bin\/torchrun|copy_log/ {print $2}')"
    if [ -n "${ranks}" ]; then
        kill -TERM ${ranks} 2>/dev/null || true
    elif [ -n "${HOSTFILE:-}" ]; then
        kill -TERM "$1" 2>/dev/null || true
    fi
}

# run_training SCRIPT RUN MODEL_TYPE [flags...]: launch src/SCRIPT for a training stage, writing
# to ${OUTPUT_ROOT:-models}/RUN with TensorBoard logs in ${TB_ROOT:-tb_logs} and the console
# copied to RUN/training.log. Flags later on the line win, so a launcher passes its defaults
# first and the user's extra flags last.
run_training() {
    local script=$1 run=$2 model_type=$3
    shift 3
    local output="${OUTPUT_ROOT:-models}/${run}"
    launch "${output}/training.log" "${script}" \
        --output_dir "${output}" \
        --enable_tensorboard \
        --tensorboard_name_path "${run//\//_}_${model_type}:${TB_ROOT:-tb_logs}" \
        --print_loss \
        --dtype "${DTYPE}" \
        "$@"
}
