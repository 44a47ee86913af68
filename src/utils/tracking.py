"""Where a run's numbers go: the trackers of --report_to on rank 0 and the --print_loss line.

Trackers (`--report_to`, comma-separated; default `tensorboard`):
- `tensorboard`: scalars to OUTPUT_DIR/tensorboard, or LOG_DIR/RUN_NAME with
  --tensorboard_name_path RUN_NAME:LOG_DIR;
- `wandb`: the same scalars and the run's flags (as its config) to Weights & Biases, run
  files under OUTPUT_DIR/wandb; project, entity and mode come from W&B's own environment
  variables (WANDB_PROJECT, default exo-align; WANDB_ENTITY; WANDB_MODE=offline to sync
  later with `wandb sync`). Needs `pip install wandb`;
- `none`: no tracker.
Every scalar is logged as PREFIX/NAME (train/loss, eval/rewards/margins, ...) at its optimizer step.
"""
import importlib.util
import os
import sys

from tqdm import tqdm

from .distributed import is_rank0
from .fileio import InputError

TRACKERS = ("tensorboard", "wandb")


def parse_report_to(value):
    """`tensorboard,wandb` -> ["tensorboard", "wandb"]; `none` -> []."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names:
        raise InputError(f"--report_to {value!r}: expected a comma-separated list of {', '.join(TRACKERS)}, or none")
    return list(dict.fromkeys(names))


def check_trackers(args):
    """Resolve --report_to (and the older --enable_tensorboard) into args.report_to, and fail
    before anything starts when a tracker's package is missing."""
    args.report_to = parse_report_to(args.report_to) if isinstance(args.report_to, str) else args.report_to
    if args.enable_tensorboard and "tensorboard" not in args.report_to:
        args.report_to.append("tensorboard")
    if "wandb" in args.report_to and importlib.util.find_spec("wandb") is None:
        raise InputError("--report_to wandb needs the wandb package: pip install wandb (or pip install -e '.[wandb]')")


class _OneLinePerRefresh:
    """tqdm's stream when stderr is not a terminal (a pipe into tee, a log file): each refresh
    becomes one whole line, not a carriage-return redraw, so that a log holds clean lines and a
    `[train step N]` line is never glued to a half-drawn bar (tqdm.write leaves this stream be)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(*args, **kwargs):
    """tqdm on stderr: redrawn in place on a terminal; elsewhere a line every few seconds."""
    if not sys.stderr.isatty():
        kwargs.setdefault("file", _OneLinePerRefresh(sys.stderr))
        kwargs.setdefault("mininterval", 5.0)
    return tqdm(*args, **kwargs)


def run_name(args):
    if args.tensorboard_name_path:
        return args.tensorboard_name_path.partition(":")[0]
    return os.path.basename(os.path.normpath(args.output_dir))


class Logger:
    """The trackers of --report_to on rank 0 and the per-step --print_loss line."""

    def __init__(self, args):
        self.print_loss = args.print_loss
        self.tensorboard = self.wandb = None
        if not is_rank0():
            return
        if "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter
            if args.tensorboard_name_path:
                name, _, log_dir = args.tensorboard_name_path.partition(":")
                log_dir = os.path.join(log_dir, name)
            else:
                log_dir = os.path.join(args.output_dir, "tensorboard")
            self.tensorboard = SummaryWriter(log_dir=log_dir)
        if "wandb" in args.report_to:
            import wandb
            os.makedirs(args.output_dir, exist_ok=True)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "exo-align"), name=run_name(args),
                                    dir=args.output_dir, config=vars(args))

    def log(self, prefix, metrics, step):
        if self.tensorboard:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        if self.wandb:
            self.wandb.log({f"{prefix}/{name}": value for name, value in metrics.items()}, step=step)
        if (self.print_loss or prefix == "eval") and is_rank0():
            tqdm.write(f"[{prefix} step {step}] " + " ".join(f"{k}={v:.6g}" for k, v in metrics.items()))

    def close(self):
        """Flush and close the trackers (once; a second call does nothing)."""
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        self.tensorboard = self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
