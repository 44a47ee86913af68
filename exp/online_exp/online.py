"""Online EXO: R rounds of sample -> score -> align, each round from the current policy.

    bash exp/online_exp/run.sh --sft_model models/x_imdb/sft --reward_model models/x_imdb/rm \\
        --data_name_path imdb/sft:data/imdb --output_dir results/online --rounds 3 --num_samples 4

The offline pipeline samples once from the SFT model; here every round samples fresh candidates
from the policy the previous round trained, so the K-way contrast stays on-policy. Each step is
the launcher or entry point of the offline pipeline (DEVICE_IDS picks the devices, as for every
launcher). Round r = 1..R:

  roundR_sample  K = --num_samples completions of every train prompt from policy r-1 (the SFT model
                 for round 1), sharded over the ranks (exp/custom_exp/inference_sft.sh)
  roundR_score   their reward-model rewards, as rw data (inference_rm.sh); the held-out split is the
                 previous evaluation's test samples of the same policy, scored by the same reward model
  roundR_align   one alignment pass (--loss_type, train_exo.sh with --resume auto) starting from
                 policy r-1, against the SFT model as the reference (--reference previous: policy r-1);
                 with --round_start continue (the default) it also takes round r-1's AdamW state and
                 data position, so that the rounds together are one optimizer run
  roundR_eval    test-prompt samples of policy r: reward-model reward, KL(pi_r || pi_sft) and, with
                 --oracle, the oracle reward (exp/quickstart/evaluate.py)
  roundR_report  OUTPUT_DIR/results.md, results.json and reward_kl_per_round.png, with rounds 0..r

round0_eval evaluates the SFT model first: the table's baseline and round 1's held-out data.
OUTPUT_DIR/roundR/manifest.json names the model round r sampled from, its reference and its
outputs; the final policy is the `policy` of the last round's manifest.

Resuming: rerunning the same command skips every finished stage and continues a killed one (a
killed alignment resumes from its last checkpoint, exactly). Each stage records what it was made
from (utils/provenance.py: its flags, the digests of the models and data it reads and of the
outputs of the stages before it) and is skipped only while that is what it would be made from
now, checked from the files whatever earlier runs did. So a changed flag or input redoes the
stages it shapes and everything after them:
  --sft_model, --data_name_path, --dataset_module, --seed  everything
  sampling (--num_samples, --temp, --max_new_tokens, --max_length, --sample_batch_size,
            --sampling_backend)
                                                           every round, from round 1's sampling
  --reward_model, scoring (--max_seq_len, --max_gen_len, --score_batch_size)
                                                           every evaluation and round, from round 1
  training (--loss_type, --reference, --max_iter_step, --learning_rate, ..., --train_args)
                                                           from round 1's alignment (its samples are kept)
  --eval_samples, --eval_seed, --eval_batch_size           every evaluation and, since an evaluation's
                                                           samples are the next round's held-out split,
                                                           every alignment from round 1
  --oracle                                                 the evaluations only
  --rounds                                                 more: only the new rounds run; fewer: the
                                                           report shows the first R. Rounds past R stay on
                                                           disk, and a later run with more rounds redoes
                                                           each of them whose earlier round has changed
A model retrained in place, or a stage's record cut short by a crash, redoes what it shapes.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

ONLINE = Path(__file__).resolve().parent
REPO_ROOT = ONLINE.parents[1]
QUICKSTART = REPO_ROOT / "exp" / "quickstart"
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(QUICKSTART))

from utils.fileio import InputError, atomic_file, atomic_write_json, atomic_write_text, cli_main, read_json_records  # noqa: E402,E501
from utils.loss import LOSS_TYPES  # noqa: E402
from utils.pipeline import Pipeline, StageFailed, run_command, run_or_exit  # noqa: E402

LAUNCHERS = REPO_ROOT / "exp" / "custom_exp"
# train_exo.sh names its output MODEL_NAME_DATA/align_LOSS_ncK under OUTPUT_ROOT (= the round's directory)
MODEL_NAME, RW_DATA_NAME = "policy", "online/rw"

# Training flags passed through to train_exo.sh when given (default: the launcher's value).
TRAIN_FLAGS = {
    "learning_rate": (float, "peak learning rate"),
    "beta_pi": (float, "scale of the policy's log-ratio in q = softmax(beta_pi h)"),
    "beta_r": (float, "temperature of the rewards in p = softmax(r / beta_r)"),
    "per_device_train_batch_size": (int, "groups of K candidates per rank and micro batch"),
    "per_device_eval_batch_size": (int, "groups per rank in evaluation and the reference pass"),
    "gradient_accumulation_steps": (int, "micro batches per optimizer step"),
    "num_train_epochs": (int, "passes over the round's samples"),
    "lr_scheduler_type": (str, "linear, cosine, constant, ..."),
    "num_warmup_steps": (int, "linear warmup of each round, in optimizer steps"),
    "weight_decay": (float, "AdamW weight decay"),
    "zero_stage": (int, "ZeRO partitioning stage"),
    "dtype": (str, "training precision: fp32, fp16 or bf16 (default: bf16 on GPUs, fp32 on CPU ranks)"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("inputs and outputs")
    g.add_argument("--sft_model", required=True, help="the SFT model: round 1's policy, pi_sft of the KL, the reference")
    g.add_argument("--reward_model", required=True, help="reward model directory (train_rm.sh output)")
    g.add_argument("--data_name_path", required=True,
                   help="NAME/KIND:PATH of the prompts (any kind with a prompt); the train split is sampled and "
                        "aligned on, the test split evaluated")
    g.add_argument("--dataset_module", nargs="*", default=[], metavar="MODULE",
                   help="Python files or module names that register the prompts' dataset class (docs/data.md: Your own "
                        "format); sampling and evaluation import them")
    g.add_argument("--output_dir", required=True, help="every round, the results and the logs go here")
    g.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                   help="redo these stages (and every stage after that depends on them); no name: redo all")
    g = parser.add_argument_group("rounds")
    g.add_argument("--rounds", type=int, default=3, help="R, rounds of sample -> score -> align")
    g.add_argument("--num_samples", type=int, default=4, help="K, completions per train prompt and round")
    g.add_argument("--loss_type", default="exo-rw", choices=LOSS_TYPES,
                   help="the alignment loss; -pref losses take the best-rewarded of each K as the winner")
    g.add_argument("--reference", default="sft", choices=["sft", "previous"],
                   help="reference of round r's alignment: the SFT model, or policy r-1 (the model it starts from)")
    g.add_argument("--seed", type=int, default=1234, help="seeds training; round r samples with seed + r")
    g.add_argument("--round_start", default="continue", choices=["continue", "restart"],
                   help="continue: round r > 1 starts from round r-1's DeepSpeed checkpoint (train_exo.py "
                        "--continue_from): its AdamW state and its position in the data order, so R rounds of S "
                        "steps take the optimizer steps and read the prompts one run of R x S steps would; restart: "
                        "each round starts AdamW afresh from the first prompts of the order, as rounds did before "
                        "--continue_from existed (docs/frontier.md measures the difference)")
    g = parser.add_argument_group("sampling (each round's train prompts)")
    g.add_argument("--temp", type=float, default=0.8,
                   help="sampling temperature, also the temperature of the alignment's and the KL's log-probs")
    g.add_argument("--max_new_tokens", type=int, default=200, help="tokens sampled per completion at most")
    g.add_argument("--max_length", type=int, default=512, help="prompt + new tokens when sampling")
    g.add_argument("--sample_batch_size", type=int, default=8, help="prompts per sampling batch and rank")
    g.add_argument("--sampling_backend", default="hf", choices=["hf", "vllm"],
                   help="inference_sft's --backend for each round's samples: vllm loads the round's policy export "
                        "into a fresh engine per round (needs vllm: README: Install); the evaluations sample with hf")
    g = parser.add_argument_group("scoring and training lengths")
    g.add_argument("--max_seq_len", type=int, default=None,
                   help="prompt + completion tokens when scoring and training; default --max_length + 8")
    g.add_argument("--max_gen_len", type=int, default=None,
                   help="completion tokens (EOS included) when scoring and training; default --max_new_tokens + 8, "
                        "so no sampled completion loses its end")
    g.add_argument("--score_batch_size", type=int, default=8, help="completions per scoring batch and rank")
    g = parser.add_argument_group("training (each round; unset: train_exo.sh's value)")
    g.add_argument("--max_iter_step", type=int, default=-1,
                   help="optimizer steps per round at most; -1: the whole pass (--num_train_epochs)")
    g.add_argument("--num_save_checkpoint", type=int, default=2,
                   help="checkpoints per round (ckpt1..N), each also a point a killed round resumes from")
    for name, (kind, text) in TRAIN_FLAGS.items():
        g.add_argument(f"--{name}", type=kind, default=None, help=text)
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (train_exo.sh's default: on)")
    g.add_argument("--train_args", default="", metavar="'FLAGS'",
                   help="further src/train_exo.py flags, one shell-quoted string, e.g. '--lora_dim 8'")
    g = parser.add_argument_group("evaluation (the test prompts, after every round)")
    g.add_argument("--eval_samples", type=int, default=None,
                   help="completions per test prompt and policy (default K; a multiple of K: they are also the "
                        "next round's held-out alignment data)")
    g.add_argument("--eval_seed", type=int, default=None,
                   help="sampling seed of the evaluation, the same for every round; default --seed + 1000")
    g.add_argument("--eval_batch_size", type=int, default=32, help="prompts (or records) per evaluation batch")
    g.add_argument("--oracle", default="none", choices=["none", "vader"],
                   help="an oracle reward besides the reward model's: vader = VADER sentiment, the quickstart's")
    args = parser.parse_args(argv)

    for name in ("rounds", "max_new_tokens", "max_length", "sample_batch_size", "score_batch_size",
                 "num_save_checkpoint", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_samples < 2:
        raise InputError(f"--num_samples must be at least 2 (the loss contrasts K candidates), got {args.num_samples}")
    if args.max_new_tokens >= args.max_length:
        raise InputError(f"--max_new_tokens {args.max_new_tokens} must be smaller than --max_length {args.max_length}")
    if args.temp <= 0:
        raise InputError(f"--temp must be positive (the alignment divides logits by it), got {args.temp}")
    if args.max_iter_step == 0 or args.max_iter_step < -1:
        raise InputError(f"--max_iter_step must be -1 (a whole pass) or at least 1, got {args.max_iter_step}")
    args.max_seq_len = args.max_seq_len or args.max_length + 8
    args.max_gen_len = args.max_gen_len or args.max_new_tokens + 8
    args.eval_samples = args.eval_samples or args.num_samples
    if args.eval_samples % args.num_samples:
        raise InputError(f"--eval_samples {args.eval_samples} must be a multiple of --num_samples {args.num_samples}: "
                         "the evaluation's samples are the next round's held-out groups of K")
    args.eval_seed = args.seed + 1000 if args.eval_seed is None else args.eval_seed
    try:
        args.train_args = shlex.split(args.train_args)
    except ValueError as err:
        raise InputError(f"--train_args: {err}") from None
    name_kind, sep, path = args.data_name_path.partition(":")
    if not sep or not path:
        raise InputError(f"--data_name_path {args.data_name_path!r}: expected NAME/KIND:PATH")
    for flag in ("sft_model", "reward_model", "output_dir"):
        setattr(args, flag, os.path.abspath(getattr(args, flag)))
    # the stages run from the repository root: a module file is found from where this was started
    args.dataset_module = [os.path.abspath(m) if m.endswith(".py") else m for m in args.dataset_module]
    return args



def check_inputs(args):
    """The inputs exist (not part of parse_args: the quickstart describes its rounds before it has
    trained their models)."""
    path = args.data_name_path.partition(":")[2]
    if not os.path.isdir(path):
        raise InputError(f"--data_name_path {args.data_name_path}: {path} is not a directory")
    for flag in ("sft_model", "reward_model"):
        if not os.path.isdir(getattr(args, flag)):
            raise InputError(f"--{flag} {getattr(args, flag)}: not a model directory")


# -- the rounds -----------------------------------------------------------------------------
def round_dir(args, r):
    return Path(args.output_dir) / f"round{r}"


def policy_dir(args, r):
    """Where round r's alignment writes its policy (train_exo.sh's naming); round 0 is the SFT model."""
    if r == 0:
        return Path(args.sft_model)
    return round_dir(args, r) / f"{MODEL_NAME}_{RW_DATA_NAME.split('/')[0]}" / f"align_{args.loss_type}_nc{args.num_samples}"


def data_dir(args):
    """The directory of --data_name_path (NAME/KIND:PATH)."""
    return Path(args.data_name_path.partition(":")[2])


def check_source_model(samples_file, expected):
    """Fail unless every record that says which model its completions came from names `expected`."""
    for index, record in enumerate(read_json_records(samples_file)):
        source = record.get("source_model")
        if source is not None and os.path.realpath(source) != os.path.realpath(expected):
            raise StageFailed(f"    {samples_file} record {index}: sampled from {source}, expected {expected}")


def train_flags(args):
    """The training flags this run passes to train_exo.sh besides the per-round ones."""
    flags = []
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    if args.gradient_checkpointing is not None:
        flags.append("--gradient_checkpointing" if args.gradient_checkpointing else "--no-gradient_checkpointing")
    return flags + args.train_args


def continue_flags(args, r):
    """Round r's --continue_from: round r-1's last DeepSpeed checkpoint (none for round 1, or with
    --round_start restart)."""
    if r == 1 or args.round_start == "restart":
        return []
    return ["--continue_from", policy_dir(args, r - 1) / "ds_checkpoints"]


def add_rounds(pipe, args, prompts, heldout, eval_root, prefix="", env=None, report=None, input_stages=()):
    """Add the stages of rounds 1..args.rounds to `pipe` (see the module docstring).

    `prompts` is the NAME/KIND:PATH the launchers read the prompts from; `heldout` is
    (rw test file of the SFT model's samples, the stage that writes it or None): round 1's
    held-out split. Round r's evaluation goes to EVAL_ROOT/roundR; `report(r)`, when given, runs
    right after it on every run (it is cheap and reads every evaluation so far). Each stage
    records the digests of the models and data it reads (utils/provenance.py) and of the
    outputs of the stages before it, so a changed input or a redone earlier round redoes it,
    whatever run redid them; `input_stages` (the stages that make the SFT model and the
    prompts, in a driver that makes them) redo round 1 in the same run. Returns the evaluation
    directories, round 1 first."""
    device_ids = os.environ.get("DEVICE_IDS", "")  # empty: the launchers' default
    env = {"TB_ROOT": str(Path(args.output_dir) / "tb_logs"), **(env or {})}
    sampling = {"num_samples": args.num_samples, "temp": args.temp, "max_new_tokens": args.max_new_tokens,
                "max_length": args.max_length, "batch_size": args.sample_batch_size, "seed": args.seed,
                **({"backend": args.sampling_backend} if args.sampling_backend != "hf" else {}),
                "sft_model": args.sft_model, "data": args.data_name_path, "dataset_module": args.dataset_module}
    scoring = {"reward_model": args.reward_model, "max_seq_len": args.max_seq_len, "max_gen_len": args.max_gen_len,
               "batch_size": args.score_batch_size}
    training = {"loss_type": args.loss_type, "reference": args.reference, "max_iter_step": args.max_iter_step,
                **({"round_start": "restart"} if args.round_start == "restart" else {}),
                "num_save_checkpoint": args.num_save_checkpoint, "flags": train_flags(args), "temp": args.temp,
                "max_seq_len": args.max_seq_len, "max_gen_len": args.max_gen_len, "seed": args.seed}
    heldout_file, heldout_stage = heldout
    eval_dirs = []
    for r in range(1, args.rounds + 1):
        name = f"{prefix}round{r}"
        source, policy, rdir = policy_dir(args, r - 1), policy_dir(args, r), round_dir(args, r)
        samples, rw = rdir / "samples", rdir / "rw"
        reference = Path(args.sft_model) if args.reference == "sft" else source
        previous = [f"{prefix}round{r - 1}_align"] if r > 1 else list(input_stages)

        def sample(log, r=r, source=source, samples=samples, policy=policy, reference=reference, rw=rw):
            run_command(["bash", LAUNCHERS / "inference_sft.sh", device_ids, prompts, "train", source,
                         "--return_num", str(args.num_samples), "--temp", str(args.temp), "--top_k", "0",
                         "--top_p", "1.0", "--max_new_tokens", str(args.max_new_tokens),
                         "--max_length", str(args.max_length), "--batch_size", str(args.sample_batch_size),
                         "--seed", str(args.seed + r), "--output_path", samples, "--backend", args.sampling_backend,
                         "--dataset_module", *args.dataset_module], log, env)
            check_source_model(samples / "train.json", source)
            atomic_write_json(round_dir(args, r) / "manifest.json",
                              {"round": r, "source_model": str(source), "reference": str(reference),
                               "samples": str(samples), "rw": str(rw), "policy": str(policy)})

        pipe.stage(f"{name}_sample", f"{args.num_samples} completions per train prompt from "
                   f"{'the SFT model' if r == 1 else f'round {r - 1} policy'}", previous, sampling,
                   [samples, rdir / "manifest.json"], sample, inputs=[data_dir(args), source])

        def score(log, samples=samples, rw=rw, heldout_file=heldout_file):
            run_command(["bash", LAUNCHERS / "inference_rm.sh", device_ids, samples, "train", args.reward_model,
                         "label", "--max_seq_len", str(args.max_seq_len), "--max_gen_len", str(args.max_gen_len),
                         "--batch_size", str(args.score_batch_size), "--output_path", rw], log, env)
            with atomic_file(rw / "test.json") as tmp:
                shutil.copyfile(heldout_file, tmp)

        pipe.stage(f"{name}_score", "reward-model rewards of the samples (rw data)",
                   [f"{name}_sample", *([heldout_stage] if heldout_stage else [])], scoring, [rw], score,
                   inputs=[args.reward_model, heldout_file])

        pipe.stage(f"{name}_align", f"{args.loss_type} from {'the SFT model' if r == 1 else f'round {r - 1} policy'}",
                   [f"{name}_score", *previous], training, [policy],
                   lambda log, r=r, source=source, reference=reference, rw=rw: run_command(
                       ["bash", LAUNCHERS / "train_exo.sh", MODEL_NAME, source, f"round{r - 1}", RW_DATA_NAME, rw,
                        args.loss_type, str(args.num_samples), "--ref_name_or_path", reference,
                        "--temp", str(args.temp), "--max_seq_len", str(args.max_seq_len),
                        "--max_gen_len", str(args.max_gen_len), "--max_iter_step", str(args.max_iter_step),
                        "--num_save_checkpoint", str(args.num_save_checkpoint), "--seed", str(args.seed),
                        "--data_output_path", Path(args.output_dir) / "cache", *train_flags(args),
                        *continue_flags(args, r), "--resume", "auto"], log,
                       {**env, "OUTPUT_ROOT": str(round_dir(args, r))}),
                   inputs=[source, reference])

        eval_dirs.append(Path(eval_root) / f"round{r}")
        add_eval(pipe, args, f"{name}_eval", f"round{r}", policy, prompts, eval_root, [f"{name}_align"])
        if report:
            pipe.stage(f"{name}_report", "results.md, results.json and reward_kl_per_round.png", [], {}, [],
                       lambda log, r=r: report(r), always=True)
        heldout_file, heldout_stage = eval_dirs[-1] / "rw" / "test.json", f"{name}_eval"
    return eval_dirs


def add_eval(pipe, args, stage_name, name, policy, prompts, eval_root, deps):
    """A stage that evaluates `policy` on the test prompts into EVAL_ROOT/NAME (evaluate.py)."""
    settings = {"eval_samples": args.eval_samples, "eval_seed": args.eval_seed, "batch_size": args.eval_batch_size,
                "oracle": args.oracle, "reward_model": args.reward_model, "temp": args.temp,
                "max_new_tokens": args.max_new_tokens, "max_length": args.max_length, "max_seq_len": args.max_seq_len,
                "max_gen_len": args.max_gen_len, "sft_model": args.sft_model, "data": args.data_name_path,
                "dataset_module": args.dataset_module}
    pipe.stage(stage_name, f"{name}'s test samples: reward-model reward{', oracle' if args.oracle != 'none' else ''}"
               f"{', KL(pi || pi_sft)' if name != 'round0' else ''}", deps, settings, [Path(eval_root) / name],
               lambda log: run_command(
                   [sys.executable, QUICKSTART / "evaluate.py", "--prompts", prompts, "--sft_model", args.sft_model,
                    f"--model={name}={policy}", "--output_dir", eval_root, "--return_num", str(args.eval_samples),
                    "--temp", str(args.temp), "--max_new_tokens", str(args.max_new_tokens),
                    "--max_length", str(args.max_length), "--max_seq_len", str(args.max_seq_len),
                    "--max_gen_len", str(args.max_gen_len), "--batch_size", str(args.eval_batch_size),
                    "--seed", str(args.eval_seed), "--reward_model", args.reward_model, "--oracle", args.oracle,
                    "--dataset_module", *args.dataset_module], log),
               inputs=[policy, args.sft_model, args.reward_model, data_dir(args)])


# -- the report -----------------------------------------------------------------------------
def _mean_se(path):
    with open(path) as f:
        summary = json.load(f)
    return summary["mean"], summary["std"] / math.sqrt(summary["n"]), summary["n"]


def optimizer_steps(policy):
    """Optimizer steps of a finished alignment: its last resumable checkpoint is at its last step."""
    with open(Path(policy) / "ds_checkpoints" / "latest") as f:
        return int(f.read().strip().removeprefix("global_step"))


def collect_rows(args, eval_root, rounds):
    rows, total = [], 0
    for r in range(rounds + 1):
        directory = Path(eval_root) / f"round{r}"
        rm_reward, rm_se, n = _mean_se(directory / "rm_reward.json")
        with open(directory / "kl.json") as f:
            kl = json.load(f)["kl"]
        steps = optimizer_steps(policy_dir(args, r)) if r else 0
        total += steps
        row = {"round": r, "policy": str(policy_dir(args, r)), "sampled_from": str(policy_dir(args, r - 1)) if r else None,
               "steps": steps, "total_steps": total, "rm_reward": rm_reward, "rm_reward_se": rm_se, "kl": kl, "n": n}
        if (directory / "reward.json").exists() and args.oracle != "none":
            row["oracle_reward"], row["oracle_reward_se"], _ = _mean_se(directory / "reward.json")
        rows.append(row)
    return rows


def plot_rounds(rows, path, title):
    """Reward (reward model, oracle) and KL(pi || pi_sft) against the round, round 0 = SFT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from report import save_figure

    rounds = [row["round"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.errorbar(rounds, [r["rm_reward"] for r in rows], yerr=[r["rm_reward_se"] for r in rows], marker="o",
                  capsize=3, label="reward model")
    if all("oracle_reward" in r for r in rows):
        left.errorbar(rounds, [r["oracle_reward"] for r in rows], yerr=[r["oracle_reward_se"] for r in rows],
                      marker="s", capsize=3, label="oracle")
    left.set_ylabel("mean reward of test samples")
    left.legend()
    right.plot(rounds, [r["kl"] for r in rows], marker="o", color="tab:red")
    right.set_ylabel("KL(π ‖ π_sft)")
    for ax in (left, right):
        ax.set_xlabel("round (0 = SFT)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(args, eval_root, rounds):
    rows = collect_rows(args, eval_root, rounds)
    out = Path(args.output_dir)
    oracle = all("oracle_reward" in r for r in rows)
    head = "| round | sampled from | steps (total) | reward-model reward |" + (" oracle reward |" if oracle else "")
    lines = [head + " KL(pi ‖ pi_sft) |", "|---" * (5 + oracle) + "|"]
    for row in rows:
        source = "—" if row["round"] == 0 else ("SFT" if row["round"] == 1 else f"round {row['round'] - 1}")
        cells = [f"{row['round']}{' (SFT)' if row['round'] == 0 else ''}", source,
                 f"{row['steps']} ({row['total_steps']})", f"{row['rm_reward']:.3f} ± {row['rm_reward_se']:.3f}"]
        if oracle:
            cells.append(f"{row['oracle_reward']:.3f} ± {row['oracle_reward_se']:.3f}")
        lines.append("| " + " | ".join(cells + [f"{row['kl']:.3f}"]) + " |")
    settings = {k: v for k, v in vars(args).items() if k != "force"}
    atomic_write_json(out / "results.json", {"rows": rows[1:], "sft": rows[0], "settings": settings})
    plot_rounds(rows, out / "reward_kl_per_round.png", f"Online {args.loss_type}, K = {args.num_samples}")
    atomic_write_text(out / "results.md", (
        f"# Online {args.loss_type}: results per round\n\n"
        f"Mean reward (± standard error) and KL(pi ‖ pi_sft) (mean log-ratio, nats per completion) of each "
        f"policy's {rows[0]['n']} samples of the test prompts; round r trains from round r-1's policy on its "
        f"own samples, against the {'SFT model' if args.reference == 'sft' else 'previous policy'} as reference. "
        f"Plot: reward_kl_per_round.png.\n\n" + "\n".join(lines) + "\n"))
    return rows


def build(args):
    out = Path(args.output_dir)
    name_kind, _, path = args.data_name_path.partition(":")
    # The sampling launcher logs beside its data (PATH_sft); a link in OUTPUT_DIR keeps that out of the user's data.
    link = out / "data" / "prompts"
    prompts = f"{name_kind}:{link}"
    eval_root = out / "eval"
    pipe = Pipeline(out, args.force)
    add_eval(pipe, args, "round0_eval", "round0", args.sft_model, prompts, eval_root, [])
    add_rounds(pipe, args, prompts, (eval_root / "round0" / "rw" / "test.json", "round0_eval"), eval_root,
               report=lambda r: write_report(args, eval_root, r))
    pipe.check_force()
    link.parent.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and os.readlink(link) == os.path.abspath(path)):
        tmp = link.with_name(".prompts.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.abspath(path), target_is_directory=True)
        os.replace(tmp, link)
    return pipe


@cli_main
def main(argv=None):
    args = parse_args(argv)
    check_inputs(args)
    pipe = build(args)
    elapsed = run_or_exit(pipe)
    print((Path(args.output_dir) / "results.md").read_text())
    print(f"online {args.loss_type} finished {args.rounds} rounds in {elapsed / 60:.1f} min; results in "
          f"{args.output_dir}/results.md and {args.output_dir}/reward_kl_per_round.png")


if __name__ == "__main__":
    main()
