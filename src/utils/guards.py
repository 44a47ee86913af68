"""What keeps a long run safe: a preemption signal stops it at a step boundary with a
checkpoint, and a non-finite loss or gradient skips the update on every rank alike.
"""
import signal
import threading
import types

import torch

from .distributed import print_rank0
from .fileio import TrainingStopped


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


def end_early(state, checkpoint, preempted):
    """Leave the run after a preemption signal (exit code 0) or too many non-finite steps."""
    if preempted:
        print_rank0(f"stopped by a signal after step {state.step}; resumable checkpoint in {checkpoint} "
                    f"(continue with --resume auto)")
        raise SystemExit(0)
    raise TrainingStopped(f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                          f"norm (last at step {state.step}); resumable checkpoint in {checkpoint}; lower "
                          f"--learning_rate or check the data, then continue with --resume")
