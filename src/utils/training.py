"""The one training loop that SFT, reward modelling and alignment share.

A stage contributes a model, datasets, a collator and `compute_loss(model, batch) ->
(loss, metrics)`; everything else — DeepSpeed, accumulation, scheduling, evaluation, logging,
checkpoint exports, exact resume, preemption and non-finite steps — happens in `train()`,
which reads top to bottom. The pieces it calls live in their own modules: flags in `args`,
ranks in `distributed`, each rank's batches in `data.loaders`, resumable checkpoints in
`checkpointing`, signal and non-finite guards in `guards`, logging in `tracking`.
"""
import os
import time

import deepspeed
import torch
from transformers import get_scheduler

from .checkpointing import (RunState, checkpoint_location, find_resume_checkpoint, load_resumable_checkpoint,
                            read_continued_state, read_run_state, run_layout, save_resumable_checkpoint,
                            set_rng_states)
from .data.loaders import distributed_loader
from .distributed import is_rank0, print_rank0, sum_across_ranks, to_device
from .ds_utils import make_optimizer, train_ds_config
from .fileio import InputError
from .guards import NonFiniteGuard, SkipAwareScheduler, StopRequest, end_early
from .model_card import model_card
from .model_utils import save_hf_model
from .tracking import Logger, progress_bar


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


def optimizer_steps(args, num_examples, batches_per_epoch, world_size):
    """Optimizer steps the run takes: every epoch's, capped by --max_iter_step."""
    total_steps = args.num_train_epochs * batches_per_epoch // args.gradient_accumulation_steps
    if args.max_iter_step > 0:
        total_steps = min(total_steps, args.max_iter_step)
    if total_steps < 1:
        raise InputError(f"{num_examples} training examples make no optimizer step with batch "
                         f"{args.per_device_train_batch_size} x accumulation {args.gradient_accumulation_steps} "
                         f"x {world_size} ranks; use smaller batches or more data")
    return total_steps


def build_engine(args, model, total_steps, world_size):
    """The DeepSpeed engine around `model`, with an AdamW whose updates the non-finite guard
    can skip and an LR schedule that does not advance on skipped updates."""
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, args)
    guard = NonFiniteGuard(optimizer)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=total_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=SkipAwareScheduler(scheduler, guard),
                                      config=train_ds_config(args, world_size))
    return engine, guard, scheduler


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


def train(args, model, tokenizer, train_dataset, eval_dataset, collator, compute_loss, device,
          summarize_metrics=None, closing_note=None):
    """Train `model` with `compute_loss` under DeepSpeed; export HF checkpoints; return the
    final eval metrics. `compute_loss(model, batch)` returns (scalar loss, {name: scalar}).

    Every logged metric is a mean of per-batch values over ranks (and accumulation steps).
    `summarize_metrics`, optional, maps such a dict to the one that is logged, for train steps
    and evaluations alike: metrics that are ratios of totals, like SFT's perplexity, are
    returned by `compute_loss` as per-batch numerator and denominator (their means share one
    divisor, so their ratio is total / total) and combined there. `closing_note`, optional,
    returns a last line for rank 0 to print once the final model is saved, or None for none
    (what a stage has to say of the whole run).

    With `--resume` the run continues from a DeepSpeed checkpoint exactly where it was
    written. On SIGTERM or SIGINT it checkpoints after the current step and exits with code 0
    (SystemExit); after --max_nonfinite_steps skipped steps in a row it checkpoints and raises
    TrainingStopped.
    """
    world_size = torch.distributed.get_world_size()
    train_loader = distributed_loader(train_dataset, args.per_device_train_batch_size, collator, True, args.seed,
                                      group_by_length=args.group_by_length)
    eval_loader = distributed_loader(eval_dataset, args.per_device_eval_batch_size, collator, False, args.seed)

    total_steps = optimizer_steps(args, len(train_dataset), len(train_loader), world_size)
    exports = export_steps(total_steps, args.num_save_checkpoint, args.save_step_interval)
    layout = run_layout(args, world_size, len(train_dataset), total_steps)
    resume_from = find_resume_checkpoint(args)
    continue_from = checkpoint_location(args.continue_from) if args.continue_from and not resume_from else None
    if resume_from:
        state = read_run_state(resume_from, layout)
    else:
        state = read_continued_state(continue_from, layout) if continue_from else RunState()
        if state.batches_done >= len(train_loader):  # the run continued from ended with an epoch
            state.epoch = state.first_epoch = state.epoch + 1
            state.batches_done = 0
    engine, guard, scheduler = build_engine(args, model, total_steps, world_size)
    if is_rank0():
        # Made once every input has been checked: a run refused for bad input leaves no directory.
        os.makedirs(args.output_dir, exist_ok=True)
    # the trackers are flushed and closed on every way out of the loop: an exception, a stop, the end
    with Logger(args) as logger:
        # ZeRO-3: ds_numel
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        print_rank0(f"training {trainable:,} parameters for "
                    f"{total_steps} optimizer steps ({len(train_dataset)} examples, {world_size} ranks)")

        if resume_from:
            rng = load_resumable_checkpoint(engine, resume_from)
            print_rank0(f"resumed from {os.path.join(*resume_from)} at step {state.step}")
        else:
            rng = None
            if continue_from:
                # its RNG states are not taken: this run's seed draws afresh from here
                load_resumable_checkpoint(engine, continue_from, scheduler=False)
                print_rank0(f"continuing from {os.path.join(*continue_from)}: its weights and optimizer state, at "
                            f"epoch {state.epoch}, batch {state.batches_done} of the data order")
            # the baseline
            logger.log("eval", evaluate(engine, eval_loader, compute_loss, device, summarize_metrics), 0)
        last_eval = (None, None)  # (step, metrics) of the latest evaluation
        sums, tokens, nonfinite_loss, started = {}, 0, False, time.perf_counter()
        bar = progress_bar(total=total_steps, initial=state.step, desc="train", disable=not is_rank0(),
                           dynamic_ncols=True)
        engine.train()
        if rng:
            set_rng_states(rng)  # last, so that nothing between here and the next batch draws from them
        with StopRequest() as stop:
            # --num_train_epochs counts from the epoch the run started in (a continued run's is later)
            while state.step < total_steps and state.epoch < state.first_epoch + args.num_train_epochs:
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
                    state.count_step(applied)
                    if not applied:
                        print_rank0(f"step {state.step}: non-finite loss or gradient norm, update skipped "
                                    f"({state.nonfinite_in_row} in a row, {state.skipped_steps} in all)")
                    elapsed = time.perf_counter() - started
                    per_batch = world_size * args.gradient_accumulation_steps
                    train_metrics = {name: totals[name] / per_batch for name in sums}
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
                        last_eval = (step, evaluate(engine, eval_loader, compute_loss, device, summarize_metrics))
                        logger.log("eval", last_eval[1], step)
                    if step in exports:
                        export_dir = os.path.join(args.output_dir, f"ckpt{exports.index(step) + 1}")
                        save_hf_model(engine, tokenizer, export_dir, args.zero_stage,
                                      model_card=model_card(args, model, export_dir, step, total_steps, world_size))
                    stopping = totals["_stop"] > 0 or state.nonfinite_in_row >= args.max_nonfinite_steps
                    if step in exports or stopping:
                        checkpoint = save_resumable_checkpoint(engine, args, state, layout)
                    if stopping:
                        bar.close()
                        end_early(state, checkpoint, preempted=totals["_stop"] > 0)
                    if step >= total_steps:
                        break
                else:
                    state.epoch, state.batches_done = state.epoch + 1, 0
        bar.close()

        if last_eval[0] == state.step:  # the last step was evaluated already (an export): one point per step
            final_metrics = last_eval[1]
        else:
            final_metrics = evaluate(engine, eval_loader, compute_loss, device, summarize_metrics)
            logger.log("eval", final_metrics, state.step)
        save_hf_model(engine, tokenizer, args.output_dir, args.zero_stage, replace_dir=False,
                      model_card=model_card(args, model, args.output_dir, state.step, total_steps, world_size))
        print_rank0(f"saved the final model to {args.output_dir}")
        note = closing_note() if closing_note else None
        if note:
            print_rank0(note)
    return final_metrics
