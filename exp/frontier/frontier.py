"""Reward–KL frontiers over beta and seeds for every method, compared at matched KL.

    bash exp/frontier/run.sh                          # the default sweep on the quickstart's miniature
    bash exp/frontier/run.sh --quick                  # the tiny grid the tests run
    bash exp/frontier/run.sh --methods exo-rw dpo-rw nca-rw --seeds 0 1 2 3   # any loss type, more seeds

For every method, beta in --betas (beta_pi = beta_r) and seed in --seeds: align from the SFT model,
export --num_checkpoints checkpoints, and evaluate each on the held-out prompts (oracle reward and
KL(pi || pi_sft), exp/quickstart/evaluate.py). A seed varies the alignment (its data order) and the
sampling of the evaluated completions; the SFT model, the reward model and the training samples
are shared (--reseed_shared: made again for every seed). With --online_rounds, rounds of online
exo-rw at --online_beta run per seed, --online_rounds x (--align_steps / --online_rounds) steps,
so that each round ends at the step of an offline checkpoint; --online_variants restart also
runs them the old way (each round restarting AdamW from the first prompts of the order).

Stages go through the quickstart's pipeline (utils/pipeline.py): each is recorded with what it was
made from, so a killed sweep resumes and an extended one (more seeds, betas or methods) runs only
its new cells. The analysis (analysis.py: frontiers, matched-KL differences with a bootstrap over
seeds and prompts, the mean reward over the common KL range) runs at the end of every run and
writes WORKDIR/results.md, results.json (every point) and frontier.png.

On a recipe's models (a GPU cluster), name them instead of building the miniature:

    bash exp/frontier/run.sh --workdir results/imdb_frontier --sft_model $MODELS/sft --reward_model $MODELS/rm \\
        --prompts imdb/sft:$DATA/imdb_prefix10 --rw_data $DATA/imdb_prefix10_rw --pref_data $DATA/imdb_prefix10_pref_p2r \\
        --oracle rm:$MODELS/class --num_contrastive 2 --betas 0.05 0.1 0.2 0.5 --seeds 0 1 2 \\
        --align_steps 800 --num_checkpoints 10 --align_lr 1e-6 --max_new_tokens 200 --max_length 512 \\
        --train_args '--per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_seq_len 512 ...'

(docs/frontier.md has the IMDB recipe's whole command.)
"""
import argparse
import shlex
import sys
import time
from pathlib import Path

FRONTIER = Path(__file__).resolve().parent
REPO_ROOT = FRONTIER.parents[1]
QUICKSTART = REPO_ROOT / "exp" / "quickstart"
sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(QUICKSTART))
sys.path.insert(0, str(REPO_ROOT / "exp" / "online_exp"))
sys.path.insert(0, str(FRONTIER))

import quickstart  # noqa: E402
from utils.fileio import InputError, atomic_write_json, cli_main  # noqa: E402
from utils.loss import LOSS_TYPES, LOSSES  # noqa: E402
from utils.pipeline import Pipeline, run_command, run_or_exit  # noqa: E402

METHODS = ("exo-rw", "dpo-rw", "exo-pref", "dpo-pref")
# Fixed before the sweep was run; docs/frontier.md says how they were chosen.
BETAS = (0.25, 0.5, 1.0)
SEEDS = (0, 1, 2)
KL_GRID = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
QUICK = ["--num_reviews", "200", "--num_train_prompts", "64", "--num_test_prompts", "16", "--sft_epochs", "1",
         "--rm_epochs", "1", "--eval_samples", "4", "--methods", "exo-rw", "dpo-rw", "--betas", "1.0",
         "--seeds", "0", "1", "--align_steps", "4", "--num_checkpoints", "2", "--align_lr", "1e-3", "--online_rounds", "2",
         "--online_seeds", "0", "--online_variants", "continue", "--bootstrap", "200"]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["bash exp/frontier/run.sh", *(shlex.quote(a) for a in argv)])
    if "--quick" in argv:  # the tiny grid first, so that any flag given overrides it
        argv = QUICK + [a for a in argv if a != "--quick"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="results/frontier", help="where every stage, model and result goes")
    parser.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                        help="redo these stages (and every stage that depends on them); no name: redo all")
    parser.add_argument("--quick", action="store_true",
                        help=f"the tiny grid the tests run: {' '.join(QUICK)} (flags given override it)")
    g = parser.add_argument_group("the sweep (its defaults are those of docs/frontier.md, fixed before it was run)")
    g.add_argument("--methods", nargs="+", default=list(METHODS), choices=LOSS_TYPES,
                   help="loss types; each is compared with dpo-rw or dpo-pref (its labels' baseline) when that runs")
    g.add_argument("--betas", nargs="+", type=float, default=list(BETAS), help="beta_pi = beta_r of each run")
    g.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS),
                   help="alignment seeds: the data order and the sampling of the evaluated completions")
    g.add_argument("--reseed_shared", action="store_true",
                   help="make the corpus, models and training samples again for every seed (seeded by it) instead "
                        "of sharing those of --seed")
    g.add_argument("--rw_labels", default="rm", choices=["rm", "oracle"],
                   help="the rewards the -rw losses (and every non-pref loss) train on: the reward model's, or the "
                        "oracle's on the same samples (no reward-model error: how much of a difference is label "
                        "noise); the miniature only, in its own --workdir")
    g.add_argument("--align_steps", type=int, default=48, help="optimizer steps of each run")
    g.add_argument("--num_checkpoints", type=int, default=6, help="checkpoints exported and evaluated per run")
    g.add_argument("--align_lr", type=float, default=5e-5, help="learning rate of every run (constant)")
    g.add_argument("--kl_grid", nargs="+", type=float, default=list(KL_GRID),
                   help="the KL values the frontiers are compared at (those inside the common range)")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the intervals")
    g.add_argument("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap's draws")
    g = parser.add_argument_group("online rounds")
    g.add_argument("--online_rounds", type=int, default=None,
                   help="rounds of online exo-rw per seed (0: none); round r ends at step r x --align_steps / R; "
                        "default 3 on the miniature, 0 on a recipe's models (run exp/online_exp there)")
    g.add_argument("--online_beta", type=float, default=None, help="their beta; default the middle of --betas")
    g.add_argument("--online_seeds", nargs="+", type=int, default=None, help="default --seeds")
    g.add_argument("--online_variants", nargs="+", default=["continue", "restart"], choices=["continue", "restart"],
                   help="online.py --round_start of the rounds run: online-exo-rw (continue) and "
                        "online-exo-rw-restart (restart)")
    g = parser.add_argument_group("a recipe's models instead of the miniature (all of --sft_model ... --oracle)")
    g.add_argument("--sft_model", help="the SFT model: every run's start and reference, pi_sft of the KL")
    g.add_argument("--reward_model", help="the reward model (the online rounds' scorer)")
    g.add_argument("--prompts", help="NAME/KIND:PATH whose test split is evaluated (and train split sampled online)")
    g.add_argument("--rw_data", help="rw training data of the -rw losses (and every non-pref loss)")
    g.add_argument("--pref_data", help="rw data converted from pref pairs (pref_to_rw.py), of the -pref losses")
    g.add_argument("--oracle", help="the evaluation's oracle: rm:PATH (a one-logit model, e.g. the IMDB classifier) "
                                    "or vader")
    g.add_argument("--num_contrastive", type=int, default=None, help="K of the rw losses (default: the miniature's)")
    g.add_argument("--train_args", default="",
                   help="further train_exo.py flags, one shell-quoted string (a recipe's launcher defaults: the runs "
                        "go through exp/custom_exp/train_exo.sh; EXO_PREF_LOG_EPS is read from the environment)")
    g.add_argument("--max_new_tokens", type=int, default=quickstart.MAX_NEW_TOKENS, help="sampled tokens at most")
    g.add_argument("--max_length", type=int, default=quickstart.MAX_LENGTH, help="prompt + sampled tokens")
    g.add_argument("--eval_batch_size", type=int, default=128, help="prompts per evaluation batch")
    # the miniature's sizes: the quickstart's flags and defaults
    qs = quickstart.parse_args([])
    g = parser.add_argument_group("the miniature (exp/quickstart's sizes; --seed seeds what the seeds share)")
    for name in ("num_reviews", "num_train_prompts", "num_test_prompts", "num_samples", "eval_samples", "sft_epochs",
                 "rm_epochs", "hidden_size", "num_layers", "seed"):
        g.add_argument(f"--{name}", type=int, default=getattr(qs, name), help=f"as the quickstart's --{name}")
    g.add_argument("--sampling_backend", default="hf", choices=["hf", "vllm"], help="as the quickstart's")
    args = parser.parse_args(argv)
    args.command = command
    external = [args.sft_model, args.reward_model, args.prompts, args.rw_data, args.pref_data, args.oracle]
    args.external = any(external)
    if args.external and not all(external):
        raise InputError("a recipe's models need all of --sft_model --reward_model --prompts --rw_data --pref_data "
                         "--oracle")
    if args.online_rounds is None:
        args.online_rounds = 0 if args.external else 3
    if args.external and args.rw_labels != "rm":
        raise InputError("--rw_labels oracle is the miniature's (a recipe's oracle-scored rw data is its --rw_data)")
    if args.external and args.online_rounds:
        raise InputError("--online_rounds with a recipe's models: run exp/online_exp/run.sh on them")
    if args.num_checkpoints < 1 or args.align_steps < args.num_checkpoints:
        raise InputError(f"--align_steps {args.align_steps} must be at least --num_checkpoints {args.num_checkpoints}")
    if args.online_rounds < 0 or (args.online_rounds and args.align_steps % args.online_rounds):
        raise InputError(f"--online_rounds {args.online_rounds} must divide --align_steps {args.align_steps}: each "
                         "round ends where an offline checkpoint does")
    if any(b <= 0 for b in args.betas) or args.align_lr <= 0:
        raise InputError("--betas and --align_lr must be positive")
    args.online_beta = args.online_beta or sorted(args.betas)[len(args.betas) // 2]
    args.online_seeds = args.online_seeds if args.online_seeds is not None else args.seeds
    args.methods = list(dict.fromkeys(args.methods))
    return args


def fmt(beta):
    return f"{beta:g}"


def cell_name(method, beta, seed):
    return f"{method}_b{fmt(beta)}_s{seed}"


def build(args):
    """The pipeline of the sweep, and the cells the analysis reads (cells.json)."""
    w = Path(args.workdir).resolve()
    pipe = Pipeline(w, args.force)
    shared = {}
    for seed in (args.seeds if args.reseed_shared else [None]):
        if args.external:
            shared[seed] = External(args, pipe, w)
            break
        qs_args = argparse.Namespace(**{**vars(args), "seed": args.seed if seed is None else seed})
        root, prefix = (w, "") if seed is None else (w / f"shared_s{seed}", f"s{seed}_")
        shared[seed] = quickstart.Shared(qs_args, pipe, root, prefix)

    def shared_for(seed):
        return shared[seed] if seed in shared else next(iter(shared.values()))

    exports = [max(1, round(args.align_steps * i / args.num_checkpoints)) for i in range(1, args.num_checkpoints + 1)]
    eval_root, cells = w / "eval", []
    for seed in args.seeds:
        s = shared_for(seed)
        eval_seed = 1000 + seed  # every policy of this seed samples its test completions with it
        s.evaluate(f"eval_sft_s{seed}", f"the SFT model's test samples, seed {seed}", ["sft"],
                   {"eval_samples": args.eval_samples, "seed": eval_seed}, [("sft", s.sft)],
                   eval_root / f"sft_s{seed}", eval_seed)
        cells.append({"method": "sft", "kind": "sft", "beta_pi": None, "seed": seed,
                      "checkpoints": {"sft": [str(eval_root / f"sft_s{seed}" / "sft"), 0]}})
        for method in args.methods:
            for beta in args.betas:
                name = cell_name(method, beta, seed)
                settings = {"steps": args.align_steps, "checkpoints": args.num_checkpoints, "lr": args.align_lr,
                            "beta": beta, "seed": seed,
                            **({"rw_labels": args.rw_labels} if args.rw_labels != "rm" else {})}
                directory = s.align(f"align_{name}", method, w / "models" / name, settings, beta, args.align_lr,
                                    args.align_steps, args.num_checkpoints, seed=seed, rw_labels=args.rw_labels)
                ckpts = [(f"ckpt{i}", directory / f"ckpt{i}") for i in range(1, args.num_checkpoints + 1)]
                s.evaluate(f"eval_{name}", f"{method}, beta {fmt(beta)}, seed {seed}: oracle reward, KL",
                           [f"align_{name}"], {"eval_samples": args.eval_samples, "seed": eval_seed}, ckpts,
                           eval_root / name, eval_seed)
                cells.append({"method": method, "kind": "offline", "beta_pi": beta, "seed": seed,
                              "checkpoints": {c: [str(eval_root / name / c), step] for (c, _), step in zip(ckpts, exports)}})
        if seed in args.online_seeds and args.online_rounds:
            cells += add_online(args, pipe, s, w, seed, eval_seed)

    labels = {m: LOSSES[m].labels for m in args.methods}
    settings = {k: v for k, v in vars(args).items() if k not in ("force", "command", "workdir")}

    def analyse(log):
        from analysis import analyse as run_analysis
        atomic_write_json(w / "cells.json", {"cells": cells, "labels": labels, "settings": settings,
                                             "command": args.command})
        run_analysis(w)

    pipe.stage("analysis", "frontiers, matched-KL comparison: results.md, results.json, frontier.png", [], {}, [],
               analyse, always=True)
    return pipe


def add_online(args, pipe, s, w, seed, eval_seed):
    """Rounds of online exo-rw at --online_beta and `seed`, per --online_variants; their cells."""
    import online
    steps = args.align_steps // args.online_rounds
    cells = []
    for variant in args.online_variants:
        method = "online-exo-rw" + ("-restart" if variant == "restart" else "")
        name = f"{method}_b{fmt(args.online_beta)}_s{seed}"
        online_args = s.online(w / "online" / name, args.online_rounds, steps, args.align_lr, args.online_beta, seed,
                               extra=["--round_start", variant, "--eval_seed", str(eval_seed)])
        eval_dirs = online.add_rounds(pipe, online_args, s.prompts, (s.rw_dir / "test.json", s.prefix + "rm_label"),
                                      w / "eval" / name, prefix=f"{name}_", input_stages=[s.prefix + "sft"])
        cells.append({"method": method, "kind": "online", "beta_pi": args.online_beta, "seed": seed,
                      "checkpoints": {d.name: [str(d), steps * r] for r, d in enumerate(eval_dirs, 1)}})
    return cells


class External:
    """A recipe's models and data in place of the miniature's stages: the same `align` and
    `evaluate` stages as quickstart.Shared. The models and data are inputs (their digests are
    recorded), not stages: the dependencies on the miniature's stages are dropped."""
    GIVEN = ("sft", "rm_label", "pref_to_rw")

    def __init__(self, args, pipe, workdir):
        self.args, self.pipe, self.prefix = args, pipe, ""
        self.sft, self.rm, self.prompts = Path(args.sft_model).resolve(), Path(args.reward_model).resolve(), args.prompts
        self.rw_dir, self.p2r_dir = Path(args.rw_data).resolve(), Path(args.pref_data).resolve()
        self.data = Path(args.prompts.partition(":")[2]).resolve()
        for path in (self.sft, self.rm, self.rw_dir, self.p2r_dir, self.data):
            if not path.exists():
                raise InputError(f"{path}: does not exist")
        self.env = {"TB_ROOT": str(Path(workdir) / "tb_logs")}
        self.train_args = shlex.split(args.train_args)

    def align(self, name, method, out_root, settings, beta, lr, steps, checkpoints, seed=None, deps=(),
              rw_labels="rm"):
        on_pref = LOSSES[method].labels == "pref"
        k = 2 if on_pref else (self.args.num_contrastive or self.args.num_samples)
        data = self.p2r_dir if on_pref else self.rw_dir
        # exp/custom_exp/train_exo.sh names its run NAME_DATA/align_LOSS_ncK under OUTPUT_ROOT
        directory = Path(out_root) / "policy_frontier" / f"align_{method}_nc{k}"
        self.pipe.stage(name, f"{method} from the SFT model, K = {k}", [d for d in deps if d not in self.GIVEN],
                        {**settings, "train_args": self.train_args}, [directory], lambda log: run_command(
                            ["bash", REPO_ROOT / "exp" / "custom_exp" / "train_exo.sh", "policy", self.sft, "sft",
                             "frontier/rw", data, method, str(k), "--beta_pi", str(beta), "--beta_r", str(beta),
                             "--learning_rate", str(lr), "--max_iter_step", str(steps), "--num_train_epochs", "100",
                             "--num_save_checkpoint", str(checkpoints), "--seed", str(seed), *self.train_args,
                             "--resume", "auto"], log, {**self.env, "OUTPUT_ROOT": str(out_root)}),
                        inputs=[self.sft, data])
        return directory

    def evaluate(self, name, description, deps, settings, models, out_dir, seed, winrate_baseline=None):
        self.pipe.stage(name, description, [d for d in deps if d not in self.GIVEN], settings, [out_dir],
                        lambda log: run_command(
                            [sys.executable, QUICKSTART / "evaluate.py", "--prompts", self.prompts, "--sft_model",
                             self.sft, *[f"--model={n}={p}" for n, p in models], "--output_dir", out_dir,
                             "--return_num", str(self.args.eval_samples), "--temp", "0.8",
                             "--max_new_tokens", str(self.args.max_new_tokens), "--max_length",
                             str(self.args.max_length), "--batch_size", str(self.args.eval_batch_size),
                             "--seed", str(seed), "--oracle", self.args.oracle], log),
                        inputs=[self.sft, self.data])


@cli_main
def main(argv=None):
    args = parse_args(argv)
    pipe = build(args)
    elapsed = run_or_exit(pipe)
    # The time of the last run that did any work: the whole sweep's when it ran from an empty
    # workdir, as docs/frontier.md's did (a rerun that only redoes the analysis keeps it).
    if pipe.redone - {"analysis"} or not (Path(args.workdir) / "timing.json").exists():
        atomic_write_json(Path(args.workdir) / "timing.json",
                          {"seconds": elapsed, "command": args.command, "finished": time.time()})
    print(Path(args.workdir, "results.md").read_text())
    print(f"frontier sweep finished in {elapsed / 60:.1f} min; results in {args.workdir}/results.md and "
          f"{args.workdir}/frontier.png")


if __name__ == "__main__":
    main()
