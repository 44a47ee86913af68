"""The one training loop that SFT, reward modelling and alignment share.

A stage contributes a model, datasets, a collator and `compute_loss(model, batch) ->
(loss, metrics)`; everything else — DeepSpeed, accumulation, scheduling, evaluation, logging,
checkpoint exports — lives here. Read `train()` top to bottom.
"""
import argparse
import os
import random
import socket
import time

import deepspeed
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig

from utils.data.data_utils import DEFAULT_CACHE_DIR, Tokenisation, build_dataset, load_raw_datasets
from utils.data.samplers import length_grouped_loader
from utils.ds_utils import make_optimizer, train_ds_config
from utils.fileio import InputError
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
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, ~30%% more compute")
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


def distributed_loader(dataset, batch_size, collator, shuffle, seed):
    sampler = DistributedSampler(dataset, num_replicas=torch.distributed.get_world_size(),
                                 rank=torch.distributed.get_rank(), shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)


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
            tqdm.write(f"[{prefix} step {step}] " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

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
    """
    world_size = torch.distributed.get_world_size()
    train_loader = (length_grouped_loader(train_dataset, args.per_device_train_batch_size, collator, args.seed)
                    if args.group_by_length else
                    distributed_loader(train_dataset, args.per_device_train_batch_size, collator, True, args.seed))
    eval_loader = distributed_loader(eval_dataset, args.per_device_eval_batch_size, collator, False, args.seed)

    total_steps = args.num_train_epochs * len(train_loader) // args.gradient_accumulation_steps
    if args.max_iter_step > 0:
        total_steps = min(total_steps, args.max_iter_step)
    if total_steps < 1:
        raise InputError(f"{len(train_dataset)} training examples make no optimizer step with batch "
                         f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
                         f"x {world_size} ranks; use smaller batches or more data")
    exports = export_steps(total_steps, args.num_save_checkpoint, args.save_step_interval)

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, args)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=train_ds_config(args, world_size))
    logger = Logger(args)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3: ds_numel
    print_rank0(f"training {trainable:,} parameters for "
                f"{total_steps} optimizer steps ({len(train_dataset)} examples, {world_size} ranks)")

    logger.log("eval", evaluate(engine, eval_loader, compute_loss, device, summarize_metrics), 0)  # the baseline
    step, micro_step = 0, 0
    sums, tokens, started = {}, 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", disable=not is_rank0(), dynamic_ncols=True)
    engine.train()
    for epoch in range(args.num_train_epochs):
        train_loader.sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = to_device(batch, device)
            loss, metrics = compute_loss(engine, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at accumulation boundaries
            micro_step += 1
            add_metrics(sums, loss, metrics)
            tokens += int(batch["attention_mask"].sum())
            if micro_step % args.gradient_accumulation_steps:
                continue

            step += 1
            elapsed = time.perf_counter() - started
            totals = sum_across_ranks({**sums, "tokens": tokens})
            train_metrics = {name: totals[name] / (world_size * args.gradient_accumulation_steps) for name in sums}
            if summarize_metrics:
                train_metrics = summarize_metrics(train_metrics)
            train_metrics["tokens_per_s"] = totals["tokens"] / elapsed
            train_metrics["lr"] = scheduler.get_last_lr()[0]
            logger.log("train", train_metrics, step)
            bar.set_postfix(loss=f"{train_metrics['loss']:.4f}", lr=f"{train_metrics['lr']:.2e}",
                            tok_s=f"{train_metrics['tokens_per_s']:.0f}")
            bar.update()
            sums, tokens, started = {}, 0, time.perf_counter()

            if step in exports or (args.eval_step_interval > 0 and step % args.eval_step_interval == 0):
                logger.log("eval", evaluate(engine, eval_loader, compute_loss, device, summarize_metrics), step)
            if step in exports:
                save_hf_model(engine, tokenizer, os.path.join(args.output_dir, f"ckpt{exports.index(step) + 1}"),
                              args.zero_stage)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    bar.close()

    final_metrics = evaluate(engine, eval_loader, compute_loss, device, summarize_metrics)
    logger.log("eval", final_metrics, step)
    save_hf_model(engine, tokenizer, args.output_dir, args.zero_stage, replace_dir=False)
    print_rank0(f"saved the final model to {args.output_dir}")
    logger.close()
    return final_metrics


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line on stderr (exit 2), like every input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def base_parser(description):
    return OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
