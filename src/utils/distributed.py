"""Process setup: joining the ranks, seeding, rank-0 helpers, each rank's share of the data,
and `Stage`, what every training stage sets up before its model.
"""
import atexit
import collections
import datetime
import faulthandler
import gc
import io
import os
import random
import signal
import socket
import sys
import threading
import time

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from .data.data_utils import DEFAULT_CACHE_DIR, Tokenisation, build_dataset, load_raw_datasets
from .data.samplers import LengthGroupedSampler, ResumableSampler, sequence_lengths
from .ds_utils import train_ds_config
from .model_utils import load_tokenizer


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
# Seconds a rank whose collective failed because a peer stopped waits before it exits (see run_stage).
PEER_STOPPED_GRACE_S = 3


def add_distributed_args(group):
    """The flags every entry script shares for joining the ranks."""
    group.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    group.add_argument("--dist_timeout_min", type=float, default=DEFAULT_DIST_TIMEOUT_MIN,
                       help="minutes a collective may wait for a rank before the run fails: bounds the hang when "
                            "a rank dies without its connections closing (an NCCL peer, a lost node). It must "
                            "cover the longest wait on one rank: tokenising the data cache, writing an export")


def _leave_process_group():
    """Destroy the process group while the interpreter is still whole, so that no collective is
    left to interpreter teardown (see `run_stage`, which ends every entry script)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_stage(main):
    """Run an entry script's `main()`, then end the process with its exit status.

    Everything a normal exit does runs first: shutting thread pools down and waiting for
    non-daemon threads, the exit handlers (leaving the process group, logging), flushing the
    files left open. Interpreter teardown is then skipped, because it
    can abort a run that succeeded: DeepSpeed holds its gloo process groups from every
    parameter, so their C++ worker threads outlive the exit handlers, and one still freeing a
    finished collective's tensors when teardown begins needs the interpreter lock, cannot get
    it, and takes the process down ("terminate called without an active exception", exit -6).
    Under torchrun the other nodes then wait five minutes at their exit barrier and fail too.

    A crash in native code (a segfault, an abort) prints every thread's Python stack first."""
    faulthandler.enable(all_threads=True)
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException as err:  # noqa: B036 -- reported as the interpreter would, with its status
        if _peer_stopped(err):
            # A collective this rank waited in failed because another rank stopped (bad input it
            # reported in one line, a crash with its own traceback): that rank's output says why.
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: a collective failed: another rank stopped first (its output says why): "
                      f"{str(err).splitlines()[0][:200]}", file=sys.stderr, flush=True)
            # The launcher reports the status of the first rank it sees exit (DeepSpeed's polls
            # every second): outlive the rank that stopped, so its status (2 for bad input) is
            # the run's, not this rank's 1. The launcher kills this rank once it has seen that.
            time.sleep(PEER_STOPPED_GRACE_S)
        else:
            sys.excepthook(*sys.exc_info())
        status = 128 + signal.SIGINT if isinstance(err, KeyboardInterrupt) else 1
    # What the interpreter does at exit before its teardown, in its order: stop the thread pools
    # (concurrent.futures' exit hooks) and wait for non-daemon threads, then run the exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    _flush_open_files()
    os._exit(status)


def _flush_open_files():
    """Flush every file object still open, as teardown would when it frees them: a buffered
    file that a stage left open would otherwise lose its last writes to os._exit."""
    # exact types: isinstance would ask every object for its __class__, and some (deprecated
    # torch attributes) warn when asked
    kinds = (io.FileIO, io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    for obj in gc.get_objects():
        if type(obj) in kinds:
            try:
                if not obj.closed:
                    obj.flush()
            except (OSError, ValueError):  # a closed pipe, a detached buffer: nothing to keep
                pass


# What gloo and NCCL say when a peer's connections close under a collective.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _peer_stopped(err):
    """Whether `err` is a collective failing because another rank of a multi-rank run stopped."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE))


def _exit_status(code):
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


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


def distributed_loader(dataset, batch_size, collator, shuffle, seed, group_by_length=False):
    """This rank's DataLoader: its share of (shuffled, or length-grouped) batches; the sampler's
    `start` lets a resumed run begin a pass part-way."""
    world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if group_by_length:
        sampler = LengthGroupedSampler(sequence_lengths(dataset), batch_size, world_size, rank, seed)
    else:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    # A private generator: otherwise every pass over a loader draws a seed from the global torch
    # RNG, and a resumed run (which starts a pass mid-epoch) would drift from the interrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator,
                      generator=torch.Generator().manual_seed(seed))


def sum_across_ranks(values):
    """{name: this rank's number} -> {name: sum over ranks}, in one all-reduce."""
    names = sorted(values)
    device = get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", 0)))
    totals = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return dict(zip(names, totals.tolist()))


class Stage:
    """What every training stage sets up first, in one place: the ranks, the device, the
    tokenizer, the tokenisation rule and the raw datasets. Under ZeRO-3 it also holds the
    `HfDeepSpeedConfig` that must stay alive while models load, so that transformers builds
    their weights already partitioned across ranks instead of whole on every rank."""

    def __init__(self, args):
        self.device = init_distributed(args)
        self.world_size = torch.distributed.get_world_size()
        args.data_output_path = args.data_output_path or DEFAULT_CACHE_DIR
        self.hf_ds_config = HfDeepSpeedConfig(train_ds_config(args, self.world_size)) if args.zero_stage == 3 else None
        self.tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
        self.tok = Tokenisation(self.tokenizer, args.max_seq_len, args.max_gen_len, args.chat_template, args.chat_template_date)
        self.raw = load_raw_datasets(args.data_name_path, args.dataset_module, args.data_split_names, args.columns)
        self.cache_dir = args.data_output_path

    def datasets(self, encoding, make_encoder):
        """{"train": (dataset, cache key), "test": (...)} tokenised by `make_encoder`."""
        return {split: build_dataset(self.raw, split, self.tok, self.cache_dir, encoding, make_encoder)
                for split in ("train", "test")}
