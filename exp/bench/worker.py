"""One measurement per process, so that its peak RSS is its own: `python worker.py TASK CONFIG_JSON OUT_JSON`.

Tasks (bench.py runs them; each writes a JSON result):
  ours_align    train_exo.main(argv): the code `python src/train_exo.py argv` runs, with step
                timestamps and token counts taken from the outside (Logger.log, the collator)
                and the time of the cached reference pass (cached_reference_logps)
  trl_align     TRL's DPOTrainer, loss_type exo_pair, on the same model and data
  step_ratio    train_exo's and train_sft's loss + backward + optimizer step on identical batches
  reference_cost  one epoch's steps with simpo, dpo-rw on cached reference log-probs and dpo-rw
                running the reference (online), rotating batch by batch in one process, and
                the cached mode's reference pass
  scaling       exo step time against K and against sequence length
  logprobs      sequence_logprobs or log_softmax + gather: time and peak memory
  sampling      utils.sampling.sample (prompts prefilled once) against plain generate, at TL;DR
                shape, as model FLOP/s over the cores' matmul FLOP/s measured around each run
  sampling_profile  torch.profiler's top ops of one sample call in each of sampling's modes
  prefix_scoring  the reference pass (model_sequence_logprobs) and inference_rm's scoring
                (reward_scores) over `gen` records, each with and without prefix sharing, and
                the policy's forward + backward on the first batches, sharing on and off
                interleaved (robust to a machine whose load changes during the run)
"""
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "src"))

import torch  # noqa: E402
from utils.process_exit import run_and_exit  # noqa: E402


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StepClock:
    """Step-end timestamps and the real (non-pad) tokens of each step's batch."""

    def __init__(self):
        self.start = None
        self.ends, self.tokens, self.losses = [], [], []
        self.pending_tokens = 0

    def add_tokens(self, attention_mask):
        self.pending_tokens += int(attention_mask.sum())

    def step_end(self, loss):
        self.ends.append(time.perf_counter())
        self.tokens.append(self.pending_tokens)
        self.losses.append(float(loss))
        self.pending_tokens = 0

    def summary(self, warmup):
        times = [b - a for a, b in zip([self.start] + self.ends[:-1], self.ends)]
        steady = slice(min(warmup, len(times) - 1), None)
        return {"steps": len(times), "step_times": times, "step_tokens": self.tokens, "epoch_s": sum(times),
                "steady_tokens_per_s": sum(self.tokens[steady]) / sum(times[steady]),
                "steady_step_s": statistics.mean(times[steady]), "first_loss": self.losses[0],
                "losses": self.losses, "train_tokens": sum(self.tokens)}


def ours_align(cfg):
    import train_exo
    from utils import tracking
    from utils.data import collators

    clock = StepClock()
    collate = collators.AlignmentCollator.__call__
    log = tracking.Logger.log
    in_training = [False]

    def counting_collate(self, examples):
        batch = collate(self, examples)
        if in_training[0]:
            clock.add_tokens(batch["attention_mask"])
        return batch

    def timed_log(self, prefix, metrics, step):
        if prefix == "eval" and step == 0:  # the baseline evaluation ends just before step 1 begins
            clock.start, in_training[0] = time.perf_counter(), True
        elif prefix == "train":
            clock.step_end(metrics["loss"])
            if step == cfg["total_steps"]:
                in_training[0] = False  # the final evaluation's batches are not training tokens
        return log(self, prefix, metrics, step)

    cached_reference_logps, reference_s = train_exo.cached_reference_logps, [0.0]

    def timed_reference(*args, **kwargs):  # the cached mode's reference pass: load, score, write (per split)
        ref_started = time.perf_counter()
        values = cached_reference_logps(*args, **kwargs)
        reference_s[0] += time.perf_counter() - ref_started
        return values

    collators.AlignmentCollator.__call__ = counting_collate
    tracking.Logger.log = timed_log
    train_exo.cached_reference_logps = timed_reference
    started = time.perf_counter()
    train_exo.main(cfg["argv"])
    from utils.sharing_cost import tally  # how --prefix_sharing auto scored the batches (all passes)
    return {"wall_s": time.perf_counter() - started, "reference_pass_s": reference_s[0], **clock.summary(cfg["warmup"]),
            "sharing_tally": dict(tally)}


def trl_align(cfg):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    clock = StepClock()
    original = DPOTrainer._compute_loss

    def counting_loss(self, model, inputs, return_outputs):
        result = original(self, model, inputs, return_outputs)
        if self.model.training:
            clock.add_tokens(inputs["attention_mask"])
            clock.pending_loss = (result[0] if isinstance(result, tuple) else result).item()
        return result

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            clock.step_end(clock.pending_loss)

    DPOTrainer._compute_loss = counting_loss
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(cfg["ref_model"], dtype=torch.float32) if cfg.get("ref_model") else None
    with open(os.path.join(cfg["data"], "train.json")) as f:
        train = datasets.Dataset.from_list(json.load(f))
    args = DPOConfig(output_dir=cfg["output_dir"], per_device_train_batch_size=cfg["batch_size"], num_train_epochs=1,
                     learning_rate=cfg["learning_rate"], lr_scheduler_type="cosine", weight_decay=0.0,
                     adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, seed=cfg["seed"],
                     loss_type=["exo_pair"], beta=cfg["beta"], label_smoothing=cfg["epsilon"],
                     use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                     **cfg["options"])
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train,
                         processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    trainer.save_model(cfg["output_dir"])  # exo-align's epoch ends by saving the model too
    return {"wall_s": time.perf_counter() - started, **clock.summary(cfg["warmup"])}


def _engine_and_batches(cfg):
    """A DeepSpeed-trained policy (train_exo's flags) and collated alignment batches."""
    import deepspeed
    import train_exo
    from utils.data.collators import AlignmentCollator
    from utils.ds_utils import make_optimizer, train_ds_config
    from utils.model_utils import load_causal_lm
    from utils.training_setup import TrainingSetup

    args = train_exo.parse_args(cfg["argv"])
    setup = TrainingSetup(args)
    model = load_causal_lm(args.model_name_or_path, setup.tokenizer, args.dtype, disable_dropout=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, args),
                                      config=train_ds_config(args, 1))
    return args, setup, engine, AlignmentCollator(setup.tokenizer.pad_token_id)


def _timed_step(engine, loss_fn, batch):
    started = time.perf_counter()
    loss, _ = loss_fn(engine, batch)
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - started


def _with_ref_logps(engine, batch, num_contrastive):
    """The batch as train_exo's cached mode sees it: reference log-probs included (here the
    initial policy's, computed once, as the cache would hold them)."""
    from utils.logprobs import model_sequence_logprobs

    with torch.no_grad():
        batch["ref_logps"] = model_sequence_logprobs(engine, batch).view(-1, num_contrastive)
    return batch


def _train_split(setup):
    """The bench's training pairs encoded as train_exo encodes them (K = 2)."""
    from utils.data.encoders import AlignmentEncoder

    dataset, _ = setup.datasets({"stage": "align", "num_contrastive": 2, "pref_labels": True},
                                lambda tokenisation, source, kind:
                                AlignmentEncoder(tokenisation, source, kind, 2, True))["train"]
    return dataset


def step_ratio(cfg):
    """train_exo's step against train_sft's on the same batches: the alignment batch's B*K
    sequences are, for SFT, 2B examples (prompt + completion each) with the same padding."""
    import train_exo
    import train_sft

    args, setup, engine, collator = _engine_and_batches(cfg)
    dataset = _train_split(setup)
    batch_size = args.per_device_train_batch_size
    batches = [collator([dataset[j] for j in range(i, i + batch_size)])
               for i in range(0, cfg["num_batches"] * batch_size, batch_size)]
    batches = [_with_ref_logps(engine, b, 2) for b in batches]

    def exo(model, batch):
        return train_exo.alignment_step_loss(model, batch, args)

    times = {"sft": [], "exo": []}
    for rep in range(cfg["repeats"] + 1):
        for i, batch in enumerate(batches):
            order = ("sft", "exo") if (rep + i) % 2 == 0 else ("exo", "sft")  # alternate: no order bias
            for name in order:
                t = _timed_step(engine, exo if name == "exo" else train_sft.sft_loss, batch)
                if rep > 0:  # the first pass warms up allocator and kernels
                    times[name].append(t)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * cfg["repeats"]
    return {"sft_s": statistics.median(times["sft"]), "exo_s": statistics.median(times["exo"]),
            "sft_total_s": sum(times["sft"]), "exo_total_s": sum(times["exo"]), "tokens": tokens,
            "ratio": sum(times["exo"]) / sum(times["sft"]), "peak_rss_mib": peak_rss_mib()}


def reference_cost(cfg):
    """What the reference costs an epoch, measured in one process so that a change of machine
    load hits every variant alike: the epoch's training steps (its own batches, the sampler of
    train_exo's flags) with the reference-free loss (simpo), with dpo-rw on cached reference
    log-probs, and with dpo-rw running the reference each step (--ref_logps online), the three
    rotating batch by batch; and the cached mode's reference pass over the training split
    (utils.reference_logps.reference_logps), before the steps in one pass and after them in the
    next. Per batch and for the reference pass, the best of cfg["repeats"] passes after an
    untimed one."""
    import deepspeed
    import train_exo
    from utils.data.loaders import distributed_loader
    from utils.distributed import to_device
    from utils.reference_logps import reference_logps
    from utils.ds_utils import eval_ds_config
    from utils.model_utils import load_causal_lm

    args, setup, engine, collator = _engine_and_batches(cfg)
    dataset = _train_split(setup)
    ref = load_causal_lm(args.ref_name_or_path, setup.tokenizer, args.dtype, disable_dropout=True)
    ref_engine, *_ = deepspeed.initialize(model=ref, config=eval_ds_config(args, 1))
    ref_engine.eval()
    loader = distributed_loader(dataset, args.per_device_train_batch_size, collator, True, args.seed,
                                group_by_length=args.group_by_length)
    loader.sampler.set_epoch(0)
    plain = [to_device(batch, setup.device) for batch in loader]
    cached = [_with_ref_logps(ref_engine, dict(batch), args.num_contrastive) for batch in plain]

    def loss_of(loss_type, ref_model=None):
        def loss(model, batch):
            args.loss_type = loss_type
            return train_exo.alignment_step_loss(model, batch, args, ref_model)
        return loss

    variants = {"simpo": (loss_of("simpo"), plain), "dpo-rw": (loss_of("dpo-rw"), cached),
                "dpo-rw online": (loss_of("dpo-rw", ref_engine), plain)}
    names = list(variants)
    best = {name: [float("inf")] * len(plain) for name in names}
    best_reference = float("inf")

    def reference_pass(rep):
        nonlocal best_reference
        started = time.perf_counter()
        reference_logps(ref_engine, dataset, collator, args, setup.device)
        if rep:
            best_reference = min(best_reference, time.perf_counter() - started)

    for rep in range(cfg["repeats"] + 1):  # the first pass warms up
        if rep % 2 == 0:
            reference_pass(rep)
        for i in range(len(plain)):
            shift = (rep + i) % len(names)
            for name in names[shift:] + names[:shift]:
                loss, batches = variants[name]
                t = _timed_step(engine, loss, batches[i])
                if rep:
                    best[name][i] = min(best[name][i], t)
        if rep % 2 == 1:
            reference_pass(rep)
    return {"steps_s": {name: sum(times) for name, times in best.items()}, "step_s": best,
            "reference_pass_s": best_reference, "batches": len(plain),
            "tokens": sum(int(b["attention_mask"].sum()) for b in plain)}


def _synthetic_batch(collator, vocab, groups, k, prompt_len, completion_len, gen):
    examples = [{"input_ids": [torch.randint(1, vocab, (prompt_len + completion_len,), generator=gen).tolist()
                               for _ in range(k)],
                 "prompt_lens": [prompt_len] * k, "rewards": [float(i == 0) for i in range(k)]} for _ in range(groups)]
    return collator(examples)


def scaling(cfg):
    """Exo step time with K candidates per group (fixed groups and length) and with sequence
    length (fixed rows): unpadded random token batches, so only the shape varies."""
    import train_exo

    args, setup, engine, collator = _engine_and_batches(cfg)
    vocab = len(setup.tokenizer)
    gen = torch.Generator().manual_seed(0)
    results = {"k": [], "length": []}

    def measure(k, prompt_len, completion_len, groups):
        args.num_contrastive = k
        batch = _with_ref_logps(engine, _synthetic_batch(collator, vocab, groups, k, prompt_len, completion_len, gen), k)
        loss_fn = lambda model, b: train_exo.alignment_step_loss(model, b, args)  # noqa: E731
        _timed_step(engine, loss_fn, batch)  # warm-up at this shape
        t = statistics.median(_timed_step(engine, loss_fn, batch) for _ in range(cfg["repeats"]))
        return {"k": k, "seq_len": prompt_len + completion_len, "rows": groups * k, "step_s": t,
                "tokens_per_s": groups * k * (prompt_len + completion_len) / t}

    for k in cfg["ks"]:
        results["k"].append(measure(k, cfg["k_prompt_len"], cfg["k_completion_len"], cfg["groups"]))
    for length in cfg["lengths"]:
        results["length"].append(measure(2, length // 4, length - length // 4, cfg["length_rows"] // 2))
    return results


def logprobs(cfg):
    """One variant in one mode: forward only (as the reference pass runs it) or forward and
    backward (as training runs it). Peak memory is the RSS high-water mark above the live logits,
    so each (variant, mode) needs a process of its own: the high-water mark never comes down."""
    from utils.logprobs import sequence_logprobs

    def naive(logits, labels, mask):
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1)
        return (token_logps * mask[:, 1:]).sum(-1)

    fn = {"naive": naive, "lean": sequence_logprobs,
          # as training runs it (model_sequence_logprobs): the gradient is built in the logits
          "lean_overwrite": lambda *a: sequence_logprobs(*a, overwrite_logits=True)}[cfg["variant"]]
    n, t, v = cfg["batch"], cfg["length"], cfg["vocab"]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, t, v, generator=gen).requires_grad_()
    # only a non-leaf may be overwritten, as a model's head output is; a view adds no memory
    as_input = (lambda x: x.view_as(x)) if cfg["variant"] == "lean_overwrite" else (lambda x: x)
    labels = torch.randint(0, v, (n, t), generator=gen)
    mask = torch.zeros(n, t)
    mask[:, t // 4:] = 1  # a quarter prompt, three quarters completion

    def run():
        if cfg["mode"] == "fwd":
            with torch.no_grad():
                return fn(as_input(logits), labels, mask)
        logits.grad = None
        value = fn(as_input(logits), labels, mask)
        value.sum().backward()
        return value

    base = peak_rss_mib()
    started = time.perf_counter()
    value = run()
    result = {"logits_mib": logits.numel() * 4 / 2**20, "peak_extra_mib": peak_rss_mib() - base,
              "first_s": time.perf_counter() - started, "checksum": float(value.sum())}
    times = []
    for _ in range(cfg["repeats"]):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    result["s"] = statistics.median(times)
    return result


def matmul_flops(repeats=10):
    """FLOP/s of a 1024^2 fp32 matmul on these cores, now (one warm-up product first)."""
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x @ y
    started = time.perf_counter()
    for _ in range(repeats):
        x @ y
    return 2 * 1024 ** 3 * repeats / (time.perf_counter() - started)


def _sampling_setup(cfg):
    """The sampling tasks' model, tokenizer, cut prompts, generation config and modes (name ->
    a function called as utils.sampling.generate_once_per_prompt is)."""
    import argparse

    from utils import sampling as hf_sampling
    from utils.sampling import fit_prompt, sampling_config
    from utils.data.tokenisation import Tokenisation
    from utils.model_utils import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg["model"])
    model = load_causal_lm(cfg["model"], tokenizer, disable_dropout=True).eval()
    tokenisation = Tokenisation(tokenizer, cfg["max_length"], cfg["max_new_tokens"])
    with open(cfg["prompts"]) as f:
        prompt_ids = [fit_prompt(tokenisation, ids) for ids in tokenisation.prompts(json.load(f))]
    config = sampling_config(argparse.Namespace(temp=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg["max_new_tokens"],
                                                return_num=cfg["return_num"]), tokenizer)
    model.generation_config = config
    once = hf_sampling.generate_once_per_prompt
    modes = {"prefilled_once": once,
             "prefilled_once_growing": lambda m, batch, c, **kw: once(m, batch, c, preallocate=False, **kw),
             "plain_generate": lambda m, batch, c, **kw: m.generate(**batch, generation_config=c, **kw)}
    return model, tokenizer, prompt_ids, config, modes


def sampling_profile(cfg):
    """torch.profiler's self-CPU time by op of one utils.sampling.sample call on the first batch
    of prompts, in each mode of `sampling` (after one untimed call per mode)."""
    from utils import sampling as hf_sampling
    from utils.sampling import sample
    from torch.profiler import ProfilerActivity, profile

    model, tokenizer, prompt_ids, config, modes = _sampling_setup(cfg)
    once, batch, modes_profiled = hf_sampling.generate_once_per_prompt, prompt_ids[:cfg["batch_size"]], {}
    for mode, generate in modes.items():
        hf_sampling.generate_once_per_prompt = generate
        sample(model, tokenizer, batch, config, 0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            sample(model, tokenizer, batch, config, 0)
            total = time.perf_counter() - started
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        modes_profiled[mode] = {"s": total, "ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
                                                    "calls": e.count} for e in ops[:cfg.get("top_ops", 8)]]}
    hf_sampling.generate_once_per_prompt = once
    return {"modes": modes_profiled}


def sampling(cfg):
    """utils.sampling.sample (each prompt prefilled once, its cache repeated K times into a
    preallocated cache) against the same with the cache grown by concatenation and against
    plain generate(num_return_sequences=K) (what sample ran first), batch by batch as the
    sampling stage's sharded loop calls it, rounds alternating which goes first, each timed
    between two measurements of the cores' matmul FLOP/s. Model arithmetic counts 2 x
    parameters per token that plain generate feeds: every prompt once per sample, every drawn
    token but the last. Forward hooks split the time into prefill (forwards of more than one
    token a row), decode steps, and everything outside the model (generate's Python, the
    sampling, the cache's repeat)."""
    from utils import sampling as hf_sampling
    from utils.sampling import sample

    model, tokenizer, prompt_ids, config, modes = _sampling_setup(cfg)
    params, k, once = sum(p.numel() for p in model.parameters()), cfg["return_num"], hf_sampling.generate_once_per_prompt

    forward_s, started_at = {"prefill": 0.0, "decode": 0.0}, []
    model.register_forward_pre_hook(lambda module, args, kwargs: started_at.append(time.perf_counter()),
                                    with_kwargs=True)

    def forward_end(module, args, kwargs, output):
        kind = "prefill" if kwargs["input_ids"].shape[1] > 1 else "decode"
        forward_s[kind] += time.perf_counter() - started_at.pop()
    model.register_forward_hook(forward_end, with_kwargs=True)

    def run(mode):
        hf_sampling.generate_once_per_prompt = modes[mode]
        forward_s.update(prefill=0.0, decode=0.0)
        fed = drawn = 0
        started = time.perf_counter()
        for i in range(0, len(prompt_ids), cfg["batch_size"]):
            batch = prompt_ids[i:i + cfg["batch_size"]]
            ids = sample(model, tokenizer, batch, config, i)[0]
            fed += sum(k * len(p) + sum(len(c) - 1 for c in per_prompt) for p, per_prompt in zip(batch, ids))
            drawn += sum(len(c) for per_prompt in ids for c in per_prompt)
        s = time.perf_counter() - started
        return {"s": s, "fed_tokens": fed, "drawn_tokens": drawn, "model_flops": 2 * params * fed / s,
                "prefill_s": forward_s["prefill"], "decode_s": forward_s["decode"],
                "outside_model_s": s - forward_s["prefill"] - forward_s["decode"]}

    sample(model, tokenizer, prompt_ids[:1], config, 0)  # warm-up
    rounds = []
    for r in range(cfg["rounds"]):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        flops = [matmul_flops()]
        result = {}
        for mode in order:
            result[mode] = run(mode)
            flops.append(matmul_flops())
            result[mode]["matmul_flops"] = (flops[-2] + flops[-1]) / 2  # the two that bracket the run
            result[mode]["ratio"] = result[mode]["model_flops"] / result[mode]["matmul_flops"]
        rounds.append(result)
    hf_sampling.generate_once_per_prompt = once
    summary = {mode: {key: statistics.mean(r[mode][key] for r in rounds) for key in rounds[0][mode]}
               for mode in modes}
    return {"params": params, "rounds": rounds, **summary}


def prefix_scoring(cfg):
    """Seconds to score every completion of cfg["data"]/train.json (its first
    cfg["num_records"]), batch by batch as calc_logprobs / inference_rm / the cached reference
    pass batch them, sharing on (or cfg["sharing"], e.g. "auto") and off; the best of
    cfg["repeats"] passes, alternating, after one untimed warm-up batch."""
    from utils.data.tokenisation import Tokenisation
    from utils.inference import completion_batch
    from utils.logprobs import model_sequence_logprobs
    from utils.model_utils import load_causal_lm, load_reward_model, load_tokenizer
    from utils.reward_scoring import reward_scores

    torch.manual_seed(0)
    tokenizer = load_tokenizer(cfg["model"])
    tokenisation = Tokenisation(tokenizer, cfg["max_seq_len"], cfg["max_gen_len"])
    with open(os.path.join(cfg["data"], "train.json")) as f:
        records = json.load(f)[:cfg.get("num_records")]
    on = cfg.get("sharing", True)
    size = cfg["batch_size"]
    batches = [completion_batch(tokenisation, records[i:i + size]) for i in range(0, len(records), size)]
    scorers = {"reference": (load_causal_lm(cfg["model"], tokenizer).eval(),
                             lambda m, b, share: model_sequence_logprobs(m, b, prefix_sharing=share)),
               "inference_rm": (load_reward_model(cfg["model"], tokenizer).eval(), reward_scores)}
    result = {}
    policy = scorers["reference"][0].train()
    step_batches = batches[:cfg["step_batches"]]
    best = {on: float("inf"), False: float("inf")}
    for repeat in range(cfg["repeats"] + 1):  # the first pass warms up
        for share in (on, False):
            started = time.perf_counter()
            for b in step_batches:
                model_sequence_logprobs(policy, b, prefix_sharing=share).sum().backward()
            if repeat:
                best[share] = min(best[share], time.perf_counter() - started)
    policy.zero_grad(set_to_none=True)
    policy.eval()
    result["policy_fwd_bwd"] = {"shared_s": best[on], "unshared_s": best[False], "max_abs_diff": float("nan"),
                                "tokens": sum(int(b["attention_mask"].sum()) for b in step_batches)}
    with torch.no_grad():
        for name, (model, score) in scorers.items():
            best = {on: float("inf"), False: float("inf")}
            outputs = {}
            for share in (on, False):
                score(model, batches[0], share)
            for _ in range(cfg["repeats"]):
                for share in (on, False):
                    started = time.perf_counter()
                    outputs[share] = torch.cat([score(model, b, share) for b in batches])
                    best[share] = min(best[share], time.perf_counter() - started)
            result[name] = {"shared_s": best[on], "unshared_s": best[False],
                            "max_abs_diff": float((outputs[on] - outputs[False]).abs().max())}
    result["tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    from utils.sharing_cost import tally  # how sharing "auto" scored the batches, where asked for
    result["sharing_tally"] = dict(tally)
    return result


TASKS = {f.__name__: f for f in (ours_align, trl_align, step_ratio, reference_cost, scaling, logprobs, sampling,
                                    sampling_profile, prefix_scoring)}

def main():
    task, cfg_path, out_path = sys.argv[1:4]
    with open(cfg_path) as f:
        config = json.load(f)
    result = TASKS[task](config)
    result.setdefault("peak_rss_mib", peak_rss_mib())
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    run_and_exit(main)
