"""The DeepSpeed configs and optimizer, built in one place for every stage."""
import os

import torch
from deepspeed.accelerator import get_accelerator


def _precision(dtype):
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale_window": 100, "initial_scale_power": 16}}
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    return {}


def train_ds_config(args, world_size):
    """Config of a trained model: ZeRO stage, optional CPU offload, precision, batch sizes.

    train_batch_size = per-device micro batch * gradient accumulation * world size.
    """
    zero = {
        "stage": args.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.zero_stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7,
            "stage3_prefetch_bucket_size": 3e7,
            # HF exports gather the partitioned weights into one state dict on rank 0
            "stage3_gather_16bit_weights_on_model_save": True,
        })
        if args.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "gradient_clipping": args.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # the training loop reports progress itself
        "wall_clock_breakdown": False,
        **_precision(args.dtype),
    }


def eval_ds_config(args, world_size):
    """Config of a frozen model (the reference): partitioned only when training uses ZeRO-3."""
    stage = 3 if args.zero_stage == 3 else 0
    zero = {"stage": stage}
    if stage == 3:
        zero.update({"stage3_param_persistence_threshold": 1e4, "stage3_prefetch_bucket_size": 3e7})
        if args.offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": args.per_device_eval_batch_size,
        "train_batch_size": args.per_device_eval_batch_size * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        **_precision(args.dtype),
    }


def _say_if_op_must_compile(op_name, what):
    """One line before DeepSpeed compiles a C++/CUDA op on its first use on this machine (the
    build is cached under torch's extension directory, ~40 s for CPUAdam), so that the silent
    wait is explained; nothing when the op is prebuilt or cached."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(op_name) or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory
        built = os.path.isfile(os.path.join(_get_build_directory(op_name, False), f"{op_name}.so"))
    except Exception:  # a private torch helper: if it moves, say it anyway
        built = False
    if not built:
        print(f"compiling DeepSpeed's {what} ({op_name}) for this machine: once, ~40 s or more; "
              "later runs load it from the cache", flush=True)


def make_optimizer(model, args):
    """AdamW without weight decay on biases and norm weights (the 1-D parameters).

    DeepSpeedCPUAdam when the optimizer state is offloaded, FusedAdam on GPUs, and
    torch's AdamW on the CPU accelerator (nothing to compile, same math).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    betas = (args.adam_beta1, args.adam_beta2)
    if args.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        _say_if_op_must_compile("cpu_adam", "CPU Adam")
        return DeepSpeedCPUAdam(groups, lr=args.learning_rate, betas=betas)
    if get_accelerator().device_name() != "cpu":
        from deepspeed.ops.adam import FusedAdam
        _say_if_op_must_compile("fused_adam", "fused Adam")
        return FusedAdam(groups, lr=args.learning_rate, betas=betas)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=betas)
