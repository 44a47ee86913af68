"""Where a run's numbers go: TensorBoard scalars on rank 0 and the per-step --print_loss line."""
import os

from tqdm import tqdm

from .distributed import is_rank0


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
