"""Resumable checkpoints: DeepSpeed's own state plus the run's position and every rank's RNG,
written atomically, pruned, and found again by `--resume`.
"""
import dataclasses
import json
import os
import random
import re
import shutil

import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from . import provenance
from .distributed import is_rank0, print_rank0
from .fileio import InputError, atomic_write_json, atomic_write_text, commit_dir


# DeepSpeed's own checkpoints (weights, optimizer and scheduler state, per rank) live in
# OUTPUT_DIR/ds_checkpoints/global_stepN, apart from the HF exports. Beside DeepSpeed's files a
# step directory holds run_state.json (step, data position, the batch layout it assumes) and
# rng_rank{r}.json (each rank's python, numpy, torch and accelerator RNG states), all JSON, so
# nothing but DeepSpeed's own files is unpickled. A checkpoint is written into a hidden
# temporary directory by every rank; once all ranks are done rank 0 adds run_state.json, renames
# the directory into place and only then names it in `latest`: a run killed at any moment leaves
# `latest` on a complete checkpoint, and an unfinished one is never taken for one. Before
# run_state.json, rank 0 records the digests of every file (provenance.json, see
# utils/provenance.py: size + sampled xxh3, seconds for a 70B run's checkpoint); a resume
# verifies them first, so a checkpoint damaged since (a bad disk, a partial copy between
# clusters) is one line, and `--resume auto` falls back to the newest intact one.
CHECKPOINT_DIR = "ds_checkpoints"
RUN_STATE_FILE = "run_state.json"
# What must match for the data order, and so the resumed run, to be the one interrupted.
LAYOUT_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
               "num_train_epochs", "num_examples", "total_steps")
# Flags the optimizer and LR schedule are built from. Their state resumes from the checkpoint as
# it was saved, so a changed value would silently not apply: a resume with another one is refused.
# (Checkpoints written before these were recorded are not checked.)
OPTIMIZER_FLAGS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm",
                   "lr_scheduler_type", "num_warmup_steps")


@dataclasses.dataclass
class RunState:
    """Where a run is: what a resumed run needs besides the weights and optimizer."""
    step: int = 0                 # optimizer steps taken (skipped ones included)
    epoch: int = 0                # the epoch being read
    batches_done: int = 0         # micro batches of `epoch` already consumed on each rank
    micro_step: int = 0           # micro batches consumed in all
    skipped_steps: int = 0        # steps skipped for a non-finite loss or gradient norm
    nonfinite_in_row: int = 0
    first_epoch: int = 0          # the epoch the run started in (--continue_from: where the last one stopped)

    def count_step(self, applied):
        """One optimizer step taken; `applied` is False when its update was skipped."""
        self.step += 1
        if applied:
            self.nonfinite_in_row = 0
        else:
            self.skipped_steps += 1
            self.nonfinite_in_row += 1


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
    """(directory, tag) to resume from, or None to start fresh. The checkpoint's files are
    verified against its record: with `--resume auto` a damaged one is named in one line and the
    newest intact one is taken; with `--resume PATH` a damaged one is an error."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        auto = os.path.join(args.output_dir, CHECKPOINT_DIR)
        if not os.path.isfile(os.path.join(auto, "latest")):
            print_rank0(f"--resume auto: no checkpoint in {auto} yet, starting from scratch")
            return None
        newest = checkpoint_location(auto)
        steps = sorted(((int(m.group(1)), name) for name in os.listdir(auto)
                        if (m := re.fullmatch(r"global_step(\d+)", name))
                        and os.path.isfile(os.path.join(auto, name, RUN_STATE_FILE))), reverse=True)
        candidates = [newest[1]] + [name for _, name in steps if name != newest[1]]
        for tag in candidates:
            problem = provenance.verify_dir(os.path.join(auto, tag))
            if problem is None:
                return auto, tag
            print_rank0(f"--resume auto: {problem}; not resuming from {tag}")
        raise InputError(f"--resume auto: no intact checkpoint in {auto} (each is named above); resume from a copy, "
                         "or start afresh in another --output_dir")
    location = checkpoint_location(args.resume)
    provenance.verified(os.path.join(*location), "--resume")
    return location


def run_layout(args, world_size, num_examples, total_steps):
    return {"world_size": world_size, "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed,
            "num_train_epochs": args.num_train_epochs, "num_examples": num_examples, "total_steps": total_steps,
            **{flag: getattr(args, flag) for flag in OPTIMIZER_FLAGS}}


def _saved_run_state(location):
    """(run_state.json's content, RunState) at `location`, or one line saying it is unreadable."""
    path = os.path.join(*location, RUN_STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return saved, RunState(**saved["state"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: unreadable run state ({err}); resume from another checkpoint") from None


def check_optimizer_flags(location, values, flag="--resume"):
    """Refuse to resume (or continue, `flag`) the checkpoint at `location` with an optimizer or
    schedule flag (of `values`, a dict or the args) other than the one it was written with."""
    layout = _saved_run_state(location)[0].get("layout", {})
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    for name in OPTIMIZER_FLAGS:
        if name in layout and layout[name] != get(name):
            raise InputError(f"{flag} {os.path.join(*location)}: written with --{name} {layout[name]}, this run has "
                             f"--{name} {get(name)}; the optimizer and its schedule resume as saved, so "
                             f"{flag.removeprefix('--').split('_')[0]} with --{name} {layout[name]} (or start a new "
                             "run in another --output_dir)")


def read_run_state(location, layout):
    """The RunState saved at `location`, after checking the run being resumed reads the same data
    in the same order (otherwise the resume would silently be a different run)."""
    saved, state = _saved_run_state(location)
    check_optimizer_flags(location, layout)
    _require_same_layout(location, saved, layout, LAYOUT_KEYS, "--resume", "resume with the flags, data and ranks of "
                         "that run")
    return state


def _require_same_layout(location, saved, layout, keys, flag, advice):
    """Refuse the checkpoint at `location` (read as `saved`) unless its layout has this run's
    value of every key in `keys`."""
    for key in keys:
        if saved["layout"].get(key) != layout[key]:
            raise InputError(f"{flag} {os.path.join(*location)}: written with {key}={saved['layout'].get(key)}, "
                             f"this run has {layout[key]}; {advice}")


def read_continued_state(location, layout):
    """The RunState a run started with --continue_from LOCATION begins in: a fresh step count at
    the data position where that run stopped. Its ranks and batch layout must be this run's, for
    DeepSpeed's partitioned optimizer state and for the position to mean the same batches."""
    saved, state = _saved_run_state(location)
    check_optimizer_flags(location, layout, flag="--continue_from")
    _require_same_layout(location, saved, layout, ("world_size", "per_device_train_batch_size",
                                                   "gradient_accumulation_steps"),
                         "--continue_from", "continue with the ranks and batch layout of that run")
    return RunState(epoch=state.epoch, batches_done=state.batches_done, first_epoch=state.epoch)


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
        provenance.record_dir(os.path.join(root, tmp_tag), {"step": state.step})
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


def load_resumable_checkpoint(engine, location, scheduler=True):
    """Restore weights, optimizer and (unless `scheduler` is False: --continue_from) the LR
    scheduler into `engine` (all ranks); returns this rank's RNG states, to be set right before
    training continues."""
    directory, tag = location
    load_path, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=scheduler)
    path = os.path.join(directory, tag, rng_file(torch.distributed.get_rank()))
    if load_path is None or not os.path.isfile(path):
        raise InputError(f"--resume {os.path.join(directory, tag)}: incomplete checkpoint (no DeepSpeed states or "
                         f"no {os.path.basename(path)}); resume from another one")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
