"""The command line every training stage shares: data, model, optimisation, DeepSpeed,
outputs and reliability flags, their checks, and the parser that turns a bad flag into one
`error:` line. A stage adds its own group of flags on top (see train_exo.parse_args).
"""
import argparse
import os

from . import provenance
from .checkpointing import CHECKPOINT_DIR, check_optimizer_flags, checkpoint_location
from .data.chat import add_chat_template_arg
from .data.raw_datasets import add_source_args, parse_columns
from .distributed import add_distributed_args
from .fileio import InputError
from .model_utils import check_position_limit
from .tracking import check_trackers


def add_training_args(parser):
    """Flags every training stage shares."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_name_path", nargs="+", required=True,
                   help="one or more NAME/KIND:PATH; KIND in sft, pref, gen, rw, class; PATH holds train and "
                        "test as .json, .jsonl or .parquet (or is a save_to_disk folder, or a Hub dataset id read "
                        "with datasets.load_dataset); several datasets are concatenated")
    add_source_args(g)
    add_chat_template_arg(g)
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
    add_distributed_args(g)

    g = parser.add_argument_group("outputs")
    g.add_argument("--output_dir", required=True,
                   help="the final model is saved here in HF format; checkpoint exports in OUTPUT_DIR/ckptN")
    g.add_argument("--num_save_checkpoint", type=int, default=0,
                   help="export N evenly spaced checkpoints ckpt1..ckptN (the last at the final step)")
    g.add_argument("--save_step_interval", type=int, default=-1,
                   help="export a checkpoint every this many optimizer steps (overrides --num_save_checkpoint)")
    g.add_argument("--eval_step_interval", type=int, default=-1,
                   help="evaluate every this many optimizer steps; evaluation also runs at every export and at the end")
    g.add_argument("--report_to", default="tensorboard", metavar="TRACKERS",
                   help="where the scalars go, comma-separated: tensorboard, wandb (the same scalars and these "
                        "flags; pip install wandb; WANDB_PROJECT, WANDB_MODE=offline ... as W&B reads them), or none")
    g.add_argument("--enable_tensorboard", action="store_true",
                   help="the same as tensorboard in --report_to (kept so that older command lines work)")
    g.add_argument("--tensorboard_name_path", default=None,
                   help="RUN_NAME:LOG_DIR for TensorBoard (logs go to LOG_DIR/RUN_NAME); default OUTPUT_DIR/tensorboard; "
                        "RUN_NAME also names the W&B run (default: the last part of OUTPUT_DIR)")
    g.add_argument("--print_loss", action="store_true", help="print a line of metrics at every optimizer step")

    g = parser.add_argument_group("reliability")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue an interrupted run exactly (weights, optimizer, scheduler, step, data order, RNG) "
                        f"from a DeepSpeed checkpoint: auto = OUTPUT_DIR/{CHECKPOINT_DIR} if it holds one, else start "
                        "fresh; PATH = such a directory (its `latest`) or one of its step directories")
    g.add_argument("--continue_from", default=None, metavar="PATH",
                   help="start a new run where a finished one stopped: its weights, AdamW state (moments and step "
                        "count) and position in the data order, from its DeepSpeed checkpoint (PATH as for --resume; "
                        "same ranks, batch layout and optimizer flags). Online rounds pass the previous round's, so a "
                        "round continues what the last one learned instead of restarting AdamW on the first prompts "
                        "of the order. The step count, LR schedule and exports start afresh; --resume wins when the "
                        "run itself has a checkpoint")
    g.add_argument("--keep_last_n", type=int, default=2,
                   help=f"resumable DeepSpeed checkpoints kept in OUTPUT_DIR/{CHECKPOINT_DIR}; one is written with "
                        "every ckptN export and on SIGTERM/SIGINT (which end the run with exit code 0)")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="an optimizer step whose loss or gradient norm is not finite is skipped; after this many in "
                        "a row the run stops with a resumable checkpoint")
    return parser


def add_disable_dropout_arg(group):
    """--disable_dropout, for the stages that keep the model's dropout by default (alignment
    always turns it off: see model_utils.load_config)."""
    group.add_argument("--disable_dropout", action="store_true",
                       help="set every dropout rate of the model to 0 (default: as in the model's config)")


def check_training_args(args):
    """Flag combinations that cannot work, caught before anything starts."""
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "max_seq_len", "max_gen_len", "num_train_epochs"]
    for name in positive:
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    parse_columns(args.columns)  # a malformed mapping fails before anything starts
    if args.only_optimize_lora and args.lora_dim <= 0:
        raise InputError("--only_optimize_lora needs --lora_dim > 0")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir}: exists and is not a directory")
    check_trackers(args)
    if args.tensorboard_name_path and ":" not in args.tensorboard_name_path:
        raise InputError(f"--tensorboard_name_path {args.tensorboard_name_path!r}: expected RUN_NAME:LOG_DIR")
    if args.offload and args.zero_stage == 0:
        raise InputError("--offload needs --zero_stage 1, 2 or 3: without ZeRO there is no partitioned optimizer "
                         "state to move to CPU memory")
    for name in ("keep_last_n", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.resume not in (None, "auto"):
        location = checkpoint_location(args.resume)  # raises if PATH holds no checkpoint
        provenance.verified(os.path.join(*location), "--resume")  # before any work, as the flags are
        check_optimizer_flags(location, args)
    if args.continue_from is not None:
        location = checkpoint_location(args.continue_from)
        provenance.verified(os.path.join(*location), "--continue_from")
        check_optimizer_flags(location, args, flag="--continue_from")
    check_position_limit(args.model_name_or_path, args.max_seq_len, "--max_seq_len", args.trust_remote_code)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line on stderr (exit 2), like every input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def base_parser(description):
    return OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
