"""The paper's IMDB experiment in miniature, on a laptop CPU, through the real pipeline.

    bash exp/quickstart/run.sh                 # ~5.5 minutes on 2 idle cores; results/quickstart/results.md
    bash exp/quickstart/run.sh --force         # redo every stage
    bash exp/quickstart/run.sh --force align_exo-rw   # redo one stage (and what depends on it)

Stages, each through the launcher or entry point a GPU user runs:
  corpus       a seeded synthetic corpus of short movie reviews (corpus.py); prompts are their first words
  base_model   a tiny GPT-2 and BPE tokenizer trained on it (src/make_tiny_model.py)
  sft          SFT on the reviews (exp/custom_exp/train_sft.sh)
  sample       completions of the train and test prompts from the SFT model (inference_sft.sh)
  oracle_pref  best-vs-worst preference pairs by the oracle, VADER's sentiment score (oracle.py)
  rm           a reward model on those pairs (train_rm.sh)
  rm_label     the samples scored by the reward model: rw data (inference_rm.sh)
  pref_to_rw   the oracle pairs as rw data with rewards [1, 0] (src/utils/data/pref_to_rw.py)
  align_M      EXO / DPO (or any --methods loss) from the SFT model, saving checkpoints (train_exo.sh): the
               -pref losses on the oracle pairs (K = 2), every other loss on the reward model's rw data
               with K = --num_samples
  eval_M       every checkpoint's test samples: oracle reward, KL(pi || pi_sft) and the win rate against
               the SFT model's test samples, judged by the oracle in both orders (evaluate.py)
  online_*     --online_rounds R (default 3) rounds of online EXO (exp/online_exp/online.py) from the SFT
               model, each sampling from the previous round's policy, scoring with the reward model and
               training --online_steps steps of exo-rw; evaluated as the checkpoints are (method online-exo-rw)
  report       results.md (the table), results.json and reward_vs_kl.png (the frontier per method)

A stage is skipped when its record says it was made from the same settings and from the outputs
of the stages it reads as they are now (utils/provenance.py); each stage's console output goes
to WORKDIR/logs/STAGE.log. The tables of docs/quickstart.md are this run's: exp/quickstart/readme_tables.py
writes and checks them. Everything is written
under --workdir (default results/quickstart).
"""
import argparse
import os
import sys
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parent
REPO_ROOT = QUICKSTART.parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(QUICKSTART))
sys.path.insert(0, str(REPO_ROOT / "exp" / "online_exp"))

from utils.fileio import InputError, atomic_dir, atomic_write_json, cli_main, commit_dir  # noqa: E402
from utils.loss import LOSS_TYPES, LOSSES  # noqa: E402
from utils.pipeline import Pipeline, run_command, run_or_exit  # noqa: E402

METHODS = ("exo-pref", "exo-rw", "dpo-pref", "dpo-rw")  # the default; --methods takes any loss type
# Every sampled completion fits the training and scoring cuts whole: the prompts are a few
# words and completions at most MAX_NEW_TOKENS tokens, stop token included (+ slack).
MAX_NEW_TOKENS, MAX_LENGTH = 64, 96
LENGTHS = ["--max_seq_len", str(MAX_LENGTH + 8), "--max_gen_len", str(MAX_NEW_TOKENS + 8)]
SAMPLING_TEMP = 0.8
MODEL_NAME, DATA_NAME = "tiny", "review"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="results/quickstart",
                        help="where data, models, logs and the results go")
    parser.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                        help="redo these stages (and every stage that depends on them); no name: redo all")
    g = parser.add_argument_group("sizes (the defaults take ~5.5 minutes on 2 idle CPU cores)")
    g.add_argument("--num_reviews", type=int, default=2000, help="reviews in the SFT corpus (train split)")
    g.add_argument("--num_train_prompts", type=int, default=512,
                   help="train prompts sampled, labelled and aligned on (the corpus's first ones)")
    g.add_argument("--num_test_prompts", type=int, default=100, help="test prompts: alignment eval and the results")
    g.add_argument("--num_samples", type=int, default=4,
                   help="completions per train prompt, K of the -rw losses (the -pref losses use K = 2)")
    g.add_argument("--eval_samples", type=int, default=4, help="completions per test prompt for each checkpoint")
    g.add_argument("--sft_epochs", type=int, default=2, help="SFT passes over the corpus")
    g.add_argument("--rm_epochs", type=int, default=3, help="reward-model passes over the preference pairs")
    g.add_argument("--align_steps", type=int, default=48, help="optimizer steps of each alignment run")
    g.add_argument("--num_checkpoints", type=int, default=3, help="checkpoints saved (and evaluated) per method")
    g.add_argument("--hidden_size", type=int, default=128, help="width of the tiny GPT-2")
    g.add_argument("--num_layers", type=int, default=2, help="layers of the tiny GPT-2")
    g.add_argument("--online_rounds", type=int, default=3,
                   help="rounds of online EXO after the offline methods (0: none; the 3 rounds take ~2.5 of the "
                        "quickstart's ~5.5 minutes on 2 idle cores)")
    g.add_argument("--online_steps", type=int, default=None,
                   help="optimizer steps per online round; default --align_steps / --num_checkpoints, so round r "
                        "has taken as many steps as the offline runs' checkpoint r")
    g.add_argument("--sampling_backend", default="hf", choices=["hf", "vllm"],
                   help="inference_sft's --backend for the SFT model's samples and the online rounds' (vllm: needs "
                        "vllm installed, README: Install); the evaluations sample with hf")
    g = parser.add_argument_group("alignment")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=LOSS_TYPES,
                   help="loss types to run (any of train_exo's; the table and plot get a row and a curve each)")
    g.add_argument("--align_lr", type=float, default=1e-4, help="learning rate of the alignment runs")
    g.add_argument("--beta", type=float, default=0.5, help="beta_pi = beta_r of the alignment losses")
    g.add_argument("--seed", type=int, default=0, help="seeds the corpus, the model and every stage")
    args = parser.parse_args(argv)
    for name in ("num_reviews", "num_train_prompts", "num_test_prompts", "eval_samples", "sft_epochs", "rm_epochs",
                 "align_steps", "num_checkpoints", "hidden_size", "num_layers"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_samples < 2:
        raise InputError(f"--num_samples must be at least 2 (preferences compare completions), got {args.num_samples}")
    if args.num_train_prompts > args.num_reviews:
        raise InputError(f"--num_train_prompts {args.num_train_prompts} exceeds --num_reviews {args.num_reviews}")
    if args.align_lr <= 0 or args.beta <= 0:
        raise InputError("--align_lr and --beta must be positive")
    if args.online_rounds < 0:
        raise InputError(f"--online_rounds must be at least 0, got {args.online_rounds}")
    args.online_steps = args.online_steps or max(1, args.align_steps // args.num_checkpoints)
    if args.online_rounds and args.eval_samples % args.num_samples:
        raise InputError(f"--eval_samples {args.eval_samples} must be a multiple of --num_samples {args.num_samples} "
                         "with --online_rounds: a round's test samples are the next round's held-out groups")
    return args


# -- the experiment -------------------------------------------------------------------------
class Shared:
    """The stages every alignment run of the miniature starts from (corpus -> pref_to_rw), added to
    `pipe`, and what a driver needs to add its own runs on them: the paths, the flags every stage
    passes and the launcher wrapper. The frontier driver (exp/frontier) adds its sweep the same way."""

    def __init__(self, args, pipe, workdir, prefix=""):
        from corpus import make_corpus
        from oracle import label_pref

        w = Path(workdir).resolve()
        self.args, self.pipe, self.workdir, self.prefix = args, pipe, w, prefix
        data, models = w / "data", w / "models"
        # the launchers' naming: sampling PATH writes PATH_sft, scoring PATH_sft writes PATH_rw
        corpus_dir, self.prompts_dir = data / DATA_NAME, data / "prompts"
        gen_dir, self.rw_dir = data / "prompts_sft", data / "prompts_rw"
        pref_dir, self.p2r_dir = data / "prompts_pref", data / "prompts_pref_p2r"
        base, self.run_root = models / MODEL_NAME, models / f"{MODEL_NAME}_{DATA_NAME}"
        self.sft, self.rm = self.run_root / "sft", self.run_root / "rm"
        self.prompts = f"{DATA_NAME}/sft:{self.prompts_dir}"
        self.env = {"OUTPUT_ROOT": str(models), "TB_ROOT": str(w / "tb_logs")}
        # The launchers recompute activations to fit large models; a tiny one fits anyway, and the
        # recompute would cost a third more time.
        self.common = [*LENGTHS, "--data_output_path", str(w / "cache"), "--seed", str(args.seed), "--zero_stage",
                       "0", "--no-gradient_checkpointing"]
        sampling = ["--max_new_tokens", str(MAX_NEW_TOKENS), "--max_length", str(MAX_LENGTH), "--temp",
                    str(SAMPLING_TEMP), "--batch_size", "64", "--seed", str(args.seed), "--backend",
                    args.sampling_backend]
        device_ids = os.environ.get("DEVICE_IDS", "")  # empty: the launchers' default
        stage = self.stage

        def write_corpus(log):
            corpus = make_corpus(args.num_reviews, args.num_test_prompts, args.seed)
            # the prompts sampled, labelled and aligned on: those of the first --num_train_prompts reviews
            prompts = {"train": corpus["train"][:args.num_train_prompts], "test": corpus["test"]}
            for directory, splits in ((corpus_dir, corpus), (self.prompts_dir, prompts)):
                tmp = atomic_dir(directory)
                for split, records in splits.items():
                    atomic_write_json(os.path.join(tmp, f"{split}.json"), records)
                commit_dir(tmp, directory)
            print(f"    {len(corpus['train'])} train and {len(corpus['test'])} test reviews in {corpus_dir}")

        def write_pref(log):
            counts = label_pref(str(gen_dir), str(pref_dir))
            print(f"    {counts['train']} train and {counts['test']} test preference pairs in {pref_dir}")

        sizes = {k: getattr(args, k) for k in ("num_reviews", "num_train_prompts", "num_test_prompts", "seed")}
        stage("corpus", "synthetic movie reviews", [], sizes, [corpus_dir, self.prompts_dir], write_corpus)
        stage("base_model", "a tiny GPT-2 and tokenizer made locally", ["corpus"],
              {"hidden_size": args.hidden_size, "num_layers": args.num_layers}, [base],
              lambda log: run_command([sys.executable, REPO_ROOT / "src" / "make_tiny_model.py", "--out", base,
                                       "--text_file", corpus_dir / "train.json", "--vocab_size", "1024",
                                       "--hidden_size", str(args.hidden_size), "--num_layers", str(args.num_layers),
                                       "--seed", str(args.seed)], log))
        stage("sft", "supervised fine-tuning on the reviews", ["base_model"], {"epochs": args.sft_epochs}, [self.sft],
              self.launch("train_sft.sh", MODEL_NAME, base, "base", f"{DATA_NAME}/sft", corpus_dir, *self.common,
                          "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                          "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3", "--num_warmup_steps", "10",
                          "--num_train_epochs", str(args.sft_epochs)))

        def sample_splits(log):
            for split in ("train", "test"):
                run_command(["bash", REPO_ROOT / "exp" / "custom_exp" / "inference_sft.sh", device_ids,
                             f"{DATA_NAME}/sft:{self.prompts_dir}", split, self.sft, *sampling,
                             "--return_num", str(args.num_samples)], log, self.env)

        stage("sample", f"{args.num_samples} completions per prompt from the SFT model", ["sft"],
              {"num_samples": args.num_samples,
               **({"backend": args.sampling_backend} if args.sampling_backend != "hf" else {})},
              [gen_dir], sample_splits)
        stage("oracle_pref", "oracle (VADER) preference pairs, best vs worst completion", ["sample"], {},
              [pref_dir], write_pref)
        stage("rm", "reward model on the oracle pairs", ["oracle_pref"], {"epochs": args.rm_epochs}, [self.rm],
              self.launch("train_rm.sh", MODEL_NAME, self.sft, "sft", f"{DATA_NAME}/pref", pref_dir, *self.common,
                          "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32",
                          "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--num_warmup_steps", "5",
                          "--num_train_epochs", str(args.rm_epochs)))

        def rm_label(log):
            for split in ("train", "test"):
                run_command(["bash", REPO_ROOT / "exp" / "custom_exp" / "inference_rm.sh", device_ids,
                             gen_dir, split, self.rm, "label", *LENGTHS, "--batch_size", "64"], log, self.env)

        stage("rm_label", "reward-model rewards of the samples (rw data)", ["rm"], {}, [self.rw_dir], rm_label)
        stage("pref_to_rw", "the oracle pairs as rw data", ["oracle_pref"], {}, [self.p2r_dir],
              lambda log: run_command([sys.executable, REPO_ROOT / "src" / "utils" / "data" / "pref_to_rw.py",
                                       pref_dir, "--output_dir", self.p2r_dir], log))

    def oracle_rw(self):
        """The reward model's rw data with the oracle's rewards instead (stage oracle_rw, added on the
        first call): runs on it differ from runs on rm_label's only by the reward model's errors."""
        from oracle import relabel_rw
        directory = self.workdir / "data" / "prompts_oracle_rw"
        if not any(s["name"] == self.prefix + "oracle_rw" for s in self.pipe.stages):
            self.stage("oracle_rw", "the samples' rw data with oracle (VADER) rewards", ["rm_label"], {}, [directory],
                       lambda log: relabel_rw(str(self.rw_dir), str(directory)))
        return directory

    def stage(self, name, *rest, **kwargs):
        """pipe.stage with this set's prefix on its name (and on its dependencies' names)."""
        description, deps, *rest = rest
        self.pipe.stage(self.prefix + name, description, [self.prefix + d for d in deps], *rest, **kwargs)

    def launch(self, script, *script_args, env=None):
        return lambda log: run_command(["bash", REPO_ROOT / "exp" / "custom_exp" / script, *script_args], log,
                                       {**self.env, **(env or {})})

    def align(self, name, method, out_root, settings, beta, lr, steps, checkpoints, seed=None, deps=(),
              rw_labels="rm"):
        """Stage `name`: `method` from the SFT model, `checkpoints` exports over `steps` steps, under
        OUT_ROOT/MODEL_NAME_DATA_NAME/align_METHOD_ncK (train_exo.sh's naming). Returns that directory.
        The -pref losses train on the oracle pairs, the others on the samples' rw data, scored by
        the reward model (`rw_labels` "rm") or by the oracle ("oracle")."""
        on_pref = LOSSES[method].labels == "pref"
        k = 2 if on_pref else self.args.num_samples
        directory = Path(out_root) / f"{MODEL_NAME}_{DATA_NAME}" / f"align_{method}_nc{k}"
        if on_pref:
            data, data_stage = self.p2r_dir, "pref_to_rw"
        elif rw_labels == "oracle":
            data, data_stage = self.oracle_rw(), "oracle_rw"
        else:
            data, data_stage = self.rw_dir, "rm_label"
        self.stage(name, f"{method} from the SFT model, K = {k}", [data_stage, *deps], settings, [directory],
                   self.launch("train_exo.sh", MODEL_NAME, self.sft, "sft", f"{DATA_NAME}/rw", data, method, str(k),
                               *self.common,
                               "--beta_pi", str(beta), "--beta_r", str(beta), "--temp", str(SAMPLING_TEMP),
                               "--per_device_train_batch_size", str(max(1, 32 // k)),
                               "--per_device_eval_batch_size", str(max(1, 64 // k)), "--gradient_accumulation_steps",
                               "1", "--learning_rate", str(lr), "--max_iter_step", str(steps),
                               "--num_train_epochs", "100", "--num_save_checkpoint", str(checkpoints),
                               *(["--seed", str(seed)] if seed is not None else []),
                               # the reward model's scores go negative, where LiPO's gains 2^r - 1 lose their meaning
                               *(["--lipo_labels", "win_rates"] if method == "lipo" else []),
                               env={"OUTPUT_ROOT": str(out_root)}))
        return directory

    def evaluate(self, name, description, deps, settings, models, out_dir, seed, winrate_baseline=None):
        """Stage `name`: evaluate.py on each (NAME, PATH) of `models` into OUT_DIR/NAME, sampling with
        `seed`; `winrate_baseline`: gen data the samples are also judged against (win rate vs SFT)."""
        winrate = ["--winrate_baseline", winrate_baseline] if winrate_baseline else []
        self.stage(name, description, deps, settings, [out_dir], lambda log: run_command(
            [sys.executable, QUICKSTART / "evaluate.py", "--prompts", self.prompts, "--sft_model", self.sft,
             *[f"--model={n}={p}" for n, p in models], "--output_dir", out_dir,
             "--return_num", str(self.args.eval_samples), "--temp", str(SAMPLING_TEMP),
             "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_length", str(MAX_LENGTH), "--batch_size", "128",
             "--seed", str(seed), *winrate], log))

    def online(self, output_dir, rounds, steps, lr, beta, seed, extra=()):
        """online.py's arguments for rounds of exo-rw on this miniature (the offline exo-rw run's settings)."""
        import online
        args, k = self.args, self.args.num_samples
        return online.parse_args([
            "--sft_model", str(self.sft), "--reward_model", str(self.rm), "--data_name_path", self.prompts,
            "--output_dir", str(output_dir), "--rounds", str(rounds), "--num_samples", str(k),
            "--loss_type", "exo-rw", "--seed", str(seed), "--temp", str(SAMPLING_TEMP),
            "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_length", str(MAX_LENGTH), "--sample_batch_size", "64",
            "--max_seq_len", str(MAX_LENGTH + 8), "--max_gen_len", str(MAX_NEW_TOKENS + 8), "--score_batch_size", "64",
            "--max_iter_step", str(steps), "--num_save_checkpoint", "1", "--num_train_epochs", "100",
            "--learning_rate", str(lr), "--beta_pi", str(beta), "--beta_r", str(beta),
            "--per_device_train_batch_size", str(max(1, 32 // k)), "--per_device_eval_batch_size", str(max(1, 64 // k)),
            "--gradient_accumulation_steps", "1", "--zero_stage", "0", "--no-gradient_checkpointing",
            "--eval_samples", str(args.eval_samples), "--eval_seed", str(seed + 1), "--eval_batch_size", "128",
            "--oracle", "vader", "--sampling_backend", args.sampling_backend, *extra])


def build(args):
    w = Path(args.workdir).resolve()
    pipe = Pipeline(w, args.force)
    shared = Shared(args, pipe, w)
    align_dirs = {}
    for method in args.methods:
        settings = {"steps": args.align_steps, "checkpoints": args.num_checkpoints, "lr": args.align_lr,
                    "beta": args.beta}
        align_dirs[method] = shared.align(f"align_{method}", method, w / "models", settings, args.beta, args.align_lr,
                                          args.align_steps, args.num_checkpoints)

    eval_root = w / "eval"
    eval_settings = {"eval_samples": args.eval_samples}
    shared.evaluate("eval_sft", "the SFT model's test samples: oracle reward", ["sft"], eval_settings,
                    [("sft", shared.sft)], eval_root / "sft", args.seed + 1)
    for method, directory in align_dirs.items():
        ckpts = [(f"ckpt{i}", directory / f"ckpt{i}") for i in range(1, args.num_checkpoints + 1)]
        shared.evaluate(f"eval_{method}", f"{method} checkpoints: oracle reward, KL(pi || pi_sft), win rate vs SFT",
                        [f"align_{method}", "eval_sft"], {**eval_settings, "winrate": "oracle, both orders"}, ckpts,
                        eval_root / method, args.seed + 1, eval_root / "sft" / "sft")

    runs = {"sft": ["sft"], **{m: [f"ckpt{i}" for i in range(1, args.num_checkpoints + 1)] for m in align_dirs}}
    if args.online_rounds:
        import online
        online_args = shared.online(w / "online", args.online_rounds, args.online_steps, args.align_lr, args.beta,
                                    args.seed)
        # round 1's held-out split: the SFT model's test samples scored by the reward model
        online.add_rounds(pipe, online_args, shared.prompts, (shared.rw_dir / "test.json", "rm_label"),
                          eval_root / "online-exo-rw", prefix="online_", input_stages=["sft"])
        runs["online-exo-rw"] = [f"round{r}" for r in range(1, args.online_rounds + 1)]

    def report(log):
        from report import write_report
        write_report(str(w), runs, vars(args))

    # cheap, and it reads every evaluation: redone on every run
    pipe.stage("report", "results.md, results.json and reward_vs_kl.png", [], {}, [], report, always=True)
    return pipe


@cli_main
def main(argv=None):
    args = parse_args(argv)
    pipe = build(args)
    elapsed = run_or_exit(pipe)
    print(Path(args.workdir, "results.md").read_text())
    print(f"quickstart finished in {elapsed / 60:.1f} min; results in {args.workdir}/results.md and "
          f"{args.workdir}/reward_vs_kl.png")


if __name__ == "__main__":
    main()
