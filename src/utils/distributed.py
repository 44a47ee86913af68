"""The ranks: joining the process group, seeding, the device, rank-0 printing, shared collectives."""
import atexit
import collections
import datetime
import os
import random
import socket

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm


def _skip_shm_allreduce():
    """Keep DeepSpeed's CPU backend from loading its shared-memory allreduce op.

    That op only speeds up `inference_all_reduce` (tensor-parallel inference), which no stage
    uses: training collectives go through torch.distributed on gloo either way. Loading it costs
    a JIT compile on first use, and a run killed mid-compile leaves a lock that makes every
    later run wait forever. Each rank that loads it also maps a 69 MB /dev/shm buffer that is
    never unlinked, so on a CPU box every run leaks RAM until /dev/shm fills."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # DeepSpeed probes op compatibility once per process and keeps the answer in this dict.
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


DEFAULT_DIST_TIMEOUT_MIN = 10


def add_distributed_args(group):
    """The flags every entry script shares for joining the ranks."""
    group.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    group.add_argument("--dist_timeout_min", type=float, default=DEFAULT_DIST_TIMEOUT_MIN,
                       help="minutes a collective may wait for a rank before the run fails: bounds the hang when "
                            "a rank dies without its connections closing (an NCCL peer, a lost node). It must "
                            "cover the longest wait on one rank: tokenising the data cache, writing an export")


def _leave_process_group():
    """Destroy the process group while the interpreter is still whole, so that no collective is
    left to interpreter teardown (see utils/process_exit.py: `run_and_exit` ends every entry script)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_distributed(args):
    """Join the process group the launcher set up (deepspeed, torchrun, or srun around either:
    RANK / LOCAL_RANK / WORLD_SIZE from the environment), or make a one-process group for plain
    `python src/<stage>.py`. Seeds everything and returns the device."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun's name; DeepSpeed's CPU accelerator reads LOCAL_SIZE
        os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu:
        _skip_shm_allreduce()
    else:
        accelerator.set_device(local_rank)
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout_min", DEFAULT_DIST_TIMEOUT_MIN))
    deepspeed.init_distributed(timeout=timeout)
    atexit.register(_leave_process_group)
    if on_cpu:
        # CPU ranks share their machine's cores; oversubscribed threads would only thrash. The
        # count is of the ranks really on this host, not the launcher's per-node size: "nodes"
        # that share one machine must split its cores as one node's ranks do, or their matmuls
        # sum in another order and the run's numbers drift from the same run on one node.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks_on_this_host()))
    set_seed(args.seed)
    return torch.device(accelerator.device_name(local_rank))


def ranks_on_this_host():
    """How many ranks of the run share this machine (one all-gather of host names)."""
    hosts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    return collections.Counter(hosts)[socket.gethostname()]


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def is_rank0():
    return torch.distributed.get_rank() == 0


def print_rank0(*args):
    if is_rank0():
        tqdm.write(" ".join(str(a) for a in args))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def sum_across_ranks(values):
    """{name: this rank's number} -> {name: sum over ranks}, in one all-reduce."""
    names = sorted(values)
    device = get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0)))
    totals = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return dict(zip(names, totals.tolist()))
