"""The one training loop that SFT, reward modelling and alignment share.

A stage contributes a model, datasets, a collator and `compute_loss(model, batch) ->
(loss, metrics)`; everything else — DeepSpeed, accumulation, scheduling, evaluation, logging,
checkpoint exports, exact resume, preemption and non-finite steps — lives here. Read `train()`
top to bottom; the checkpoint mechanics are the small functions above it.
"""
import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
import types

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig

from utils.data.data_utils import DEFAULT_CACHE_DIR, Tokenisation, build_dataset, load_raw_datasets
from utils.data.samplers import LengthGroupedSampler, StartPartWay, sequence_lengths
from utils.ds_utils import make_optimizer, train_ds_config
from utils.fileio import InputError, TrainingStopped, atomic_write_json, atomic_write_text, commit_dir
from utils.model_utils import load_tokenizer, save_hf_model


# -- flags --------------------------------------------------------------------------------
def add_training_args(parser):
    """Flags every training stage shares (DESIGN.md section 3)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_name_path", nargs="+", required=True,
                   help="one or more NAME/KIND:PATH; KIND in sft, pref, gen, rw, class; PATH holds "
                        "train.json[l] and test.json[l]; several datasets are concatenated")
    g.add_argument("--dataset_module", nargs="*", default=[],
                   help="python files or modules to import first, so their @register_dataset classes "
                        "can be named in --data_name_path")
    g.add_argument("--data_output_path", default=None,
                   help="where tokenised datasets (and reference log-probs) are cached; default "
                        "$XDG_CACHE_HOME/exo_align (~/.cache/exo_align)")
    g.add_argument("--max_seq_len", type=int, default=512, help="prompt + completion tokens; the prompt is cut on the left")
    g.add_argument("--max_gen_len", type=int, default=256, help="completion tokens (EOS included); cut on the right")

    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", required=True, help="Hugging Face model directory (or hub name) to train")
    g.add_argument("--trust_remote_code", action="store_true",
                   help="allow model code shipped inside the checkpoint directory to run")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass: less memory, ~30%% more compute "
                        "(--no-gradient_checkpointing undoes a launcher's default)")
    g.add_argument("--lora_dim", type=int, default=0, help="LoRA rank; 0 trains the full model without adapters")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (scaling alpha / rank); default = rank")
    g.add_argument("--lora_module_name", default="all-linear",
                   help="comma-separated module names to adapt, or all-linear (every linear layer but the head)")
    g.add_argument("--only_optimize_lora", action="store_true", help="train only the LoRA adapters; freeze the base")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=int, default=4, help="micro batch per rank")
    g.add_argument("--per_device_eval_batch_size", type=int, default=4, help="eval (and reference pass) batch per rank")
    g.add_argument("--group_by_length", action="store_true",
                   help="train on batches of similar length (shuffled within mega-batches, batch order shuffled): "
                        "far less padding; see utils/data/samplers.py")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping by global norm; 0 disables")
    g.add_argument("--num_train_epochs", type=int, default=1, help="passes over the training data")
    g.add_argument("--max_iter_step", type=int, default=-1,
                   help="stop after this many optimizer steps (the LR schedule is sized to it); -1: no cap")
    g.add_argument("--lr_scheduler_type", default="cosine",
                   help="any transformers scheduler: linear, cosine, constant, constant_with_warmup, ...")
    g.add_argument("--num_warmup_steps", type=int, default=0, help="linear warmup, in optimizer steps")
    g.add_argument("--seed", type=int, default=1234, help="seeds python, numpy, torch and the data order")

    g = parser.add_argument_group("deepspeed")
    g.add_argument("--zero_stage", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO partitioning stage")
    g.add_argument("--offload", action="store_true", help="keep optimizer state (and ZeRO-3 params) in CPU memory")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="training precision")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")

    g = parser.add_argument_group("outputs")
    g.add_argument("--output_dir", required=True,
                   help="the final model is saved here in HF format; checkpoint exports in OUTPUT_DIR/ckptN")
    g.add_argument("--num_save_checkpoint", type=int, default=0,
                   help="export N evenly spaced checkpoints ckpt1..ckptN (the last at the final step)")
    g.add_argument("--save_step_interval", type=int, default=-1,
                   help="export a checkpoint every this many optimizer steps (overrides --num_save_checkpoint)")
    g.add_argument("--eval_step_interval", type=int, default=-1,
                   help="evaluate every this many optimizer steps; evaluation also runs at every export and at the end")
    g.add_argument("--enable_tensorboard", action="store_true", help="write TensorBoard scalars")
    g.add_argument("--tensorboard_name_path", default=None,
                   help="RUN_NAME:LOG_DIR for TensorBoard (logs go to LOG_DIR/RUN_NAME); default OUTPUT_DIR/tensorboard")
    g.add_argument("--print_loss", action="store_true", help="print a line of metrics at every optimizer step")

    g = parser.add_argument_group("reliability")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue an interrupted run exactly (weights, optimizer, scheduler, step, data order, RNG) "
                        f"from a DeepSpeed checkpoint: auto = OUTPUT_DIR/{CHECKPOINT_DIR} if it holds one, else start "
                        "fresh; PATH = such a directory (its `latest`) or one of its step directories")
    g.add_argument("--keep_last_n", type=int, default=2,
                   help=f"resumable DeepSpeed checkpoints kept in OUTPUT_DIR/{CHECKPOINT_DIR}; one is written with "
                        "every ckptN export and on SIGTERM/SIGINT (which end the run with exit code 0)")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="an optimizer step whose loss or gradient norm is not finite is skipped; after this many in "
                        "a row the run stops with a resumable checkpoint")
    return parser


def check_training_args(args):
    """Flag combinations that cannot work, caught before anything starts."""
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_seq_len", "max_gen_len", "num_train_epochs"]
    for name in positive:
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.only_optimize_lora and args.lora_dim <= 0:
        raise InputError("--only_optimize_lora needs --lora_dim > 0")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir}: exists and is not a directory")
    if args.tensorboard_name_path and ":" not in args.tensorboard_name_path:
        raise InputError(f"--tensorboard_name_path {args.tensorboard_name_path!r}: expected RUN_NAME:LOG_DIR")
    if args.offload and args.zero_stage == 0:
        raise InputError("--offload needs --zero_stage 1, 2 or 3: without ZeRO there is no partitioned optimizer "
                         "state to move to CPU memory")
    for name in ("keep_last_n", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.resume not in (None, "auto"):
        checkpoint_location(args.resume)  # raises if PATH holds no checkpoint


# -- processes ----------------------------------------------------------------------------
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


def init_distributed(args):
    """Join the process group the launcher set up, or make a one-process group for plain
    `python src/<stage>.py`. Seeds everything and returns the device."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() == "cpu":
        # CPU ranks share the cores; oversubscribed threads would only thrash.
        local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        _skip_shm_allreduce()
    else:
        accelerator.set_device(local_rank)
    deepspeed.init_distributed()
    set_seed(args.seed)
    return torch.device(accelerator.device_name(local_rank))


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
        self.tok = Tokenisation(self.tokenizer, args.max_seq_len, args.max_gen_len)
        self.raw = load_raw_datasets(args.data_name_path, args.dataset_module)
        self.cache_dir = args.data_output_path

    def datasets(self, encoding, make_encoder):
        """{"train": (dataset, cache key), "test": (...)} tokenised by `make_encoder`."""
        return {split: build_dataset(self.raw, split, self.tok, self.cache_dir, encoding, make_encoder)
                for split in ("train", "test")}


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


def add_metrics(sums, loss, metrics):
    for name, value in {"loss": loss, **metrics}.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)


def mean_metrics(sums, num_batches):
    """Per-batch means over all ranks of metrics summed over this rank's `num_batches`."""
    totals = sum_across_ranks({**sums, "_batches": num_batches})
    return {name: totals[name] / totals["_batches"] for name in sums}


def export_steps(total_steps, num_save_checkpoint, save_step_interval):
    """Optimizer steps after which ckpt1, ckpt2, ... are exported."""
    if save_step_interval > 0:
        return list(range(save_step_interval, total_steps + 1, save_step_interval))
    if num_save_checkpoint > 0:
        return sorted({max(1, round(total_steps * i / num_save_checkpoint)) for i in range(1, num_save_checkpoint + 1)})
    return []


class Logger:
    """TensorBoard scalars on rank 0 (when enabled) and the per-step --print_loss line."""

    def __init__(self, args):
        self.writer = None
        self.print_loss = args.print_loss
        if args.enable_tensorboard and is_rank0():
            from torch.utils.tensorboard import SummaryWriter
            if args.tensorboard_name_path:
                name, _, log_dir = args.tensorboard_name_path.partition(":")
                log_dir = os.path.join(log_dir, name)
            else:
                log_dir = os.path.join(args.output_dir, "tensorboard")
            self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, prefix, metrics, step):
        if self.writer:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        if (self.print_loss or prefix == "eval") and is_rank0():
            tqdm.write(f"[{prefix} step {step}] " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))

    def close(self):
        if self.writer:
            self.writer.close()


@torch.no_grad()
def evaluate(engine, loader, compute_loss, device, summarize_metrics=None):
    """Per-batch means of the loss and metrics over the whole eval set and all ranks
    (then passed through `summarize_metrics`, see `train`)."""
    engine.eval()
    sums, count = {}, 0
    for batch in loader:
        add_metrics(sums, *compute_loss(engine, to_device(batch, device)))
        count += 1
    engine.train()
    metrics = mean_metrics(sums, count)
    return summarize_metrics(metrics) if summarize_metrics else metrics


# -- resumable checkpoints ----------------------------------------------------------------
# DeepSpeed's own checkpoints (weights, optimizer and scheduler state, per rank) live in
# OUTPUT_DIR/ds_checkpoints/global_stepN, apart from the HF exports. Beside DeepSpeed's files a
# step directory holds run_state.json (step, data position, the batch layout it assumes) and
# rng_rank{r}.json (each rank's python, numpy, torch and accelerator RNG states), all JSON, so
# nothing but DeepSpeed's own files is unpickled. A checkpoint is written into a hidden
# temporary directory by every rank; once all ranks are done rank 0 adds run_state.json, renames
# the directory into place and only then names it in `latest`: a run killed at any moment leaves
# `latest` on a complete checkpoint, and an unfinished one is never taken for one.
CHECKPOINT_DIR = "ds_checkpoints"
RUN_STATE_FILE = "run_state.json"
# What must match for the data order, and so the resumed run, to be the one interrupted.
LAYOUT_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
               "num_train_epochs", "num_examples", "total_steps")


@dataclasses.dataclass
class RunState:
    """Where a run is: what a resumed run needs besides the weights and optimizer."""
    step: int = 0                 # optimizer steps taken (skipped ones included)
    epoch: int = 0                # the epoch being read
    batches_done: int = 0         # micro batches of `epoch` already consumed on each rank
    micro_step: int = 0           # micro batches consumed in all
    skipped_steps: int = 0        # steps skipped for a non-finite loss or gradient norm
    nonfinite_in_row: int = 0


def checkpoint_location(path):
    """(checkpoint directory, tag) that PATH names: a ds_checkpoints directory (its `latest`) or
    one of its step directories."""
    if os.path.basename(os.path.abspath(path)).startswith("."):
        raise InputError(f"--resume {path}: an unfinished checkpoint (its save was interrupted); pass the "
                         "directory that holds it to resume from its `latest`")
    if os.path.isfile(os.path.join(path, RUN_STATE_FILE)):
        return os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
        if os.path.isfile(os.path.join(path, tag, RUN_STATE_FILE)):
            return path, tag
        raise InputError(f"--resume {path}: `latest` names {tag!r}, which is not a complete checkpoint")
    raise InputError(f"--resume {path}: not a resumable checkpoint (no `latest` file and no {RUN_STATE_FILE}); "
                     f"pass OUTPUT_DIR/{CHECKPOINT_DIR}, one of its global_stepN directories, or auto")


def find_resume_checkpoint(args):
    """(directory, tag) to resume from, or None to start fresh."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        auto = os.path.join(args.output_dir, CHECKPOINT_DIR)
        if not os.path.isfile(os.path.join(auto, "latest")):
            print_rank0(f"--resume auto: no checkpoint in {auto} yet, starting from scratch")
            return None
        return checkpoint_location(auto)
    return checkpoint_location(args.resume)


def run_layout(args, world_size, num_examples, total_steps):
    return {"world_size": world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
            "num_train_epochs": args.num_train_epochs, "num_examples": num_examples, "total_steps": total_steps}


def read_run_state(location, layout):
    """The RunState saved at `location`, after checking the run being resumed reads the same data
    in the same order (otherwise the resume would silently be a different run)."""
    path = os.path.join(*location, RUN_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        state = RunState(**saved["state"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable run state ({err}); resume from another checkpoint") from None
    for key in LAYOUT_KEYS:
        if saved["layout"].get(key) != layout[key]:
            raise InputError(f"--resume {os.path.join(*location)}: written with {key}={saved['layout'].get(key)}, "
                             f"this run has {layout[key]}; resume with the flags, data and ranks of that run")
    return state


def rng_states():
    return {"python": _jsonable(random.getstate()),
            "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state().tolist(),
            "accelerator": get_accelerator().get_rng_state().tolist()}


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value.tolist() if isinstance(value, np.ndarray) else value


def set_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    get_accelerator().set_rng_state(torch.tensor(states["accelerator"], dtype=torch.uint8))


def rng_file(rank):
    return f"rng_rank{rank}.json"


def save_resumable_checkpoint(engine, args, state, layout):
    """Write OUTPUT_DIR/ds_checkpoints/global_stepN (all ranks call this), point `latest` at it
    and keep the last --keep_last_n. Returns the step directory."""
    root = os.path.join(args.output_dir, CHECKPOINT_DIR)
    tag = f"global_step{state.step}"
    tmp_tag = f".{tag}.tmp"  # one name on every rank: DeepSpeed writes each rank's files into it
    if is_rank0():
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)  # left by a killed save
    torch.distributed.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    rank = torch.distributed.get_rank()
    atomic_write_json(os.path.join(root, tmp_tag, rng_file(rank)), rng_states(), indent=None)
    torch.distributed.barrier()  # every rank's files are written
    if rank == 0:
        # written last: a directory with run_state.json is a complete checkpoint
        atomic_write_json(os.path.join(root, tmp_tag, RUN_STATE_FILE),
                          {"state": dataclasses.asdict(state), "layout": layout})
        commit_dir(os.path.join(root, tmp_tag), os.path.join(root, tag))
        atomic_write_text(os.path.join(root, "latest"), tag)
        prune_checkpoints(root, args.keep_last_n, state.step)
    torch.distributed.barrier()
    return os.path.join(root, tag)


def prune_checkpoints(root, keep_last_n, step):
    """Keep the last `keep_last_n` checkpoints up to `step`, the one just written. Any later one
    is left from a run this one replaces (a fresh start, or a resume from an older step)."""
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root)
                   if (m := re.fullmatch(r"global_step(\d+)", name)))
    kept = [name for s, name in steps if s <= step][-keep_last_n:]
    for _, name in steps:
        if name not in kept:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def load_resumable_checkpoint(engine, location):
    """Restore weights, optimizer and scheduler into `engine` (all ranks); returns this rank's RNG
    states, to be set right before training continues."""
    directory, tag = location
    load_path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    path = os.path.join(directory, tag, rng_file(torch.distributed.get_rank()))
    if load_path is None or not os.path.isfile(path):
        raise InputError(f"--resume {os.path.join(directory, tag)}: incomplete checkpoint (no DeepSpeed states or "
                         f"no {os.path.basename(path)}); resume from another one")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ResumableSampler(StartPartWay, DistributedSampler):
    """DistributedSampler whose next pass can start part-way (StartPartWay)."""

    def order(self):
        return DistributedSampler.__iter__(self)


# -- preemption and non-finite steps ------------------------------------------------------
class StopRequest:
    """SIGTERM and SIGINT, while training, only raise a flag: the loop finishes the step, ranks
    agree on it in their per-step all-reduce (so all of them stop at the same step and meet in
    the checkpoint's collectives), write a resumable checkpoint and exit 0. Further signals are
    absorbed too: DeepSpeed's launcher answers a signal with its own SIGTERM to every rank,
    then waits 30 s before SIGKILL."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class SkipAwareScheduler:
    """The LR scheduler as DeepSpeed drives it: it does not advance on updates the guard skipped."""

    def __init__(self, scheduler, guard):
        self.scheduler, self.guard = scheduler, guard

    def step(self, *args, **kwargs):
        if not self.guard.skipped:
            self.scheduler.step(*args, **kwargs)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self):
        return self.scheduler.get_last_lr()


class NonFiniteGuard:
    """Skips an optimizer update whose loss or gradients are not finite, on every rank alike.

    DeepSpeed skips a step with a non-finite gradient norm itself under ZeRO 1-3 (its overflow
    check); without ZeRO it applies it. The guard wraps the optimizer DeepSpeed drives, so the
    update is skipped in every configuration: when the loop reports a non-finite loss on any
    rank (`skip_requested`, from the all-reduce every rank takes part in) or when a gradient
    it would apply is not finite (without ZeRO, gradients are already all-reduced, so every rank
    sees the same). The scheduler wrapper keeps the LR schedule on updates actually applied,
    as DeepSpeed does for the steps it skips."""

    def __init__(self, optimizer):
        self.skip_requested = False
        self.skipped = False
        step = optimizer.step

        def guarded_step(optimizer, *args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            # one device sync for all tensors, not one per tensor
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            self.skipped = self.skip_requested or not finite
            if not self.skipped:
                return step(*args, **kwargs)
            return None

        # a bound method, as torch's LR schedulers expect to find (and wrap) there
        optimizer.step = types.MethodType(guarded_step, optimizer)

    def step(self, engine, skip):
        """engine.step() at an accumulation boundary; True if the update was applied."""
        self.skip_requested, self.skipped = skip, False
        engine.step()
        return not self.skipped and engine.was_step_applied()



# -- the loop -----------------------------------------------------------------------------
def train(args, model, tokenizer, train_dataset, eval_dataset, collator, compute_loss, device,
          summarize_metrics=None):
    """Train `model` with `compute_loss` under DeepSpeed; export HF checkpoints; return the
    final eval metrics. `compute_loss(model, batch)` returns (scalar loss, {name: scalar}).

    Every logged metric is a mean of per-batch values over ranks (and accumulation steps).
    `summarize_metrics`, optional, maps such a dict to the one that is logged, for train steps
    and evaluations alike: metrics that are ratios of totals, like SFT's perplexity, are
    returned by `compute_loss` as per-batch numerator and denominator (their means share one
    divisor, so their ratio is total / total) and combined there.

    With `--resume` the run continues from a DeepSpeed checkpoint exactly where it was
    written. On SIGTERM or SIGINT it checkpoints after the current step and exits with code 0
    (SystemExit); after --max_nonfinite_steps skipped steps in a row it checkpoints and raises
    TrainingStopped.
    """
    world_size = torch.distributed.get_world_size()
    train_loader = distributed_loader(train_dataset, args.per_device_train_batch_size, collator, True, args.seed,
                                      group_by_length=args.group_by_length)
    eval_loader = distributed_loader(eval_dataset, args.per_device_eval_batch_size, collator, False, args.seed)

    total_steps = args.num_train_epochs * len(train_loader) // args.gradient_accumulation_steps
    if args.max_iter_step > 0:
        total_steps = min(total_steps, args.max_iter_step)
    if total_steps < 1:
        raise InputError(f"{len(train_dataset)} training examples make no optimizer step with batch "
                         f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
                         f"x {world_size} ranks; use smaller batches or more data")
    exports = export_steps(total_steps, args.num_save_checkpoint, args.save_step_interval)
    layout = run_layout(args, world_size, len(train_dataset), total_steps)
    resume_from = find_resume_checkpoint(args)
    state = read_run_state(resume_from, layout) if resume_from else RunState()

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, args)
    guard = NonFiniteGuard(optimizer)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=SkipAwareScheduler(scheduler, guard),
                                      config=train_ds_config(args, world_size))
    logger = Logger(args)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3: ds_numel
    print_rank0(f"training {trainable:,} parameters for "
                f"{total_steps} optimizer steps ({len(train_dataset)} examples, {world_size} ranks)")

    if resume_from:
        rng = load_resumable_checkpoint(engine, resume_from)
        print_rank0(f"resumed from {os.path.join(*resume_from)} at step {state.step}")
    else:
        rng = None
        logger.log("eval", evaluate(engine, eval_loader, compute_loss, device, summarize_metrics), 0)  # the baseline
    sums, tokens, nonfinite_loss, started = {}, 0, False, time.perf_counter()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", disable=not is_rank0(), dynamic_ncols=True)
    engine.train()
    if rng:
        set_rng_states(rng)  # last, so that nothing between here and the next batch draws from them
    with StopRequest() as stop:
        while state.step < total_steps and state.epoch < args.num_train_epochs:
            train_loader.sampler.set_epoch(state.epoch)
            train_loader.sampler.start = state.batches_done * args.per_device_train_batch_size
            for batch in train_loader:
                batch = to_device(batch, device)
                loss, metrics = compute_loss(engine, batch)
                engine.backward(loss)
                state.batches_done += 1
                state.micro_step += 1
                add_metrics(sums, loss, metrics)
                tokens += int(batch["attention_mask"].sum())
                nonfinite_loss = nonfinite_loss or not bool(torch.isfinite(loss.detach()).all())
                if state.micro_step % args.gradient_accumulation_steps:
                    engine.step()  # DeepSpeed only counts the micro step
                    continue

                # One all-reduce per step gives every rank the metrics and the same verdicts.
                totals = sum_across_ranks({**sums, "tokens": tokens, "_nonfinite_loss": nonfinite_loss,
                                           "_stop": stop.signum is not None})
                applied = guard.step(engine, skip=totals["_nonfinite_loss"] > 0)
                state.step += 1
                if applied:
                    state.nonfinite_in_row = 0
                else:
                    state.skipped_steps += 1
                    state.nonfinite_in_row += 1
                    print_rank0(f"step {state.step}: non-finite loss or gradient norm, update skipped "
                                f"({state.nonfinite_in_row} in a row, {state.skipped_steps} in all)")
                elapsed = time.perf_counter() - started
                train_metrics = {name: totals[name] / (world_size * args.gradient_accumulation_steps) for name in sums}
                if summarize_metrics:
                    train_metrics = summarize_metrics(train_metrics)
                train_metrics["tokens_per_s"] = totals["tokens"] / elapsed
                train_metrics["lr"] = scheduler.get_last_lr()[0]
                train_metrics["skipped_steps"] = state.skipped_steps
                logger.log("train", train_metrics, state.step)
                bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", lr=f"{train_metrics['lr']:.2e}",
                                tok_s=f"{train_metrics['tokens_per_s']:.0f}")
                bar.update()
                sums, tokens, nonfinite_loss, started = {}, 0, False, time.perf_counter()

                step = state.step
                if step in exports or (args.eval_step_interval > 0 and step % args.eval_step_interval == 0):
                    logger.log("eval", evaluate(engine, eval_loader, compute_loss, device, summarize_metrics), step)
                if step in exports:
                    save_hf_model(engine, tokenizer, os.path.join(args.output_dir, f"ckpt{exports.index(step) + 1}"),
                                  args.zero_stage)
                stopping = totals["_stop"] > 0 or state.nonfinite_in_row >= args.max_nonfinite_steps
                if step in exports or stopping:
                    checkpoint = save_resumable_checkpoint(engine, args, state, layout)
                if stopping:
                    bar.close()
                    logger.close()
                    end_early(state, checkpoint, preempted=totals["_stop"] > 0)
                if step >= total_steps:
                    break
            else:
                state.epoch, state.batches_done = state.epoch + 1, 0
    bar.close()

    final_metrics = evaluate(engine, eval_loader, compute_loss, device, summarize_metrics)
    logger.log("eval", final_metrics, state.step)
    save_hf_model(engine, tokenizer, args.output_dir, args.zero_stage, replace_dir=False)
    print_rank0(f"saved the final model to {args.output_dir}")
    logger.close()
    return final_metrics


def end_early(state, checkpoint, preempted):
    """Leave the run after a preemption signal (exit code 0) or too many non-finite steps."""
    if preempted:
        print_rank0(f"stopped by a signal after step {state.step}; resumable checkpoint in {checkpoint} "
                    f"(continue with --resume auto)")
        raise SystemExit(0)
    raise TrainingStopped(f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                          f"norm (last at step {state.step}); resumable checkpoint in {checkpoint}; lower "
                          f"--learning_rate or check the data, then continue with --resume")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line on stderr (exit 2), like every input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def base_parser(description):
    return OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
