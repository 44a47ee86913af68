"""Alignment stage: EXO, DPO or a listwise baseline over K contrastive candidates per prompt (the objective: utils/loss.py, README "The objective").

    deepspeed src/train_exo.py --model_name_or_path models/x_imdb/sft \\
        --data_name_path imdb/rw:data/imdb_rw --loss_type exo-rw --num_contrastive 4 \\
        --beta_r 0.5 --beta_pi 0.5 --temp 0.8 --output_dir models/x_imdb/align_exo-rw_nc4

One training example is a group of K candidates of one prompt, so a micro batch of B holds
B * K sequences, scored in one policy forward. The frozen reference's log-probs are a
function of the data: by default they are computed once before training and cached beside
the tokenised data (utils/reference_logps.py), and the reference is dropped from memory
(`--ref_logps online` keeps it and recomputes them every step instead). A reference-free loss (simpo) never loads it.
"""
import gc
from functools import partial

import utils  # noqa: F401  before deepspeed, which logs on import what utils/quiet.py silences
import deepspeed
import torch

from utils.data.collators import AlignmentCollator
from utils.data.encoders import AlignmentEncoder
from utils.ds_utils import eval_ds_config
from utils.fileio import InputError, cli_main
from utils.loss import (DEFAULT_SIMPO_MARGIN, LOSS_TYPES, LOSSES, alignment_loss, label_error, resolve_pref_epsilon,
                        win_rate_labels)
from utils.logprobs import add_fused_logprobs_arg, model_sequence_logprobs
from utils.model_utils import apply_lora, check_position_limit, load_causal_lm
from utils.prefix_sharing import add_prefix_sharing_arg, resolve_prefix_sharing
from utils.sharing_cost import sharing_summary
from utils.args import add_training_args, base_parser, check_training_args
from utils.training_setup import TrainingSetup
from utils.process_exit import run_and_exit
from utils.reference_logps import cached_reference_logps
from utils.training import train


def parse_args(argv=None):
    parser = add_training_args(base_parser(__doc__.split("\n\n")[0]))
    g = parser.add_argument_group("alignment")
    g.add_argument("--ref_name_or_path", default=None, help="frozen reference model; default: --model_name_or_path")
    g.add_argument("--loss_type", default="exo-pref", choices=LOSS_TYPES,
                   help="exo-* minimise KL(q||p) (mode-seeking), dpo-* CE(p, q); -pref labels are "
                        "winner-take-(1-eps), -rw labels softmax(r / beta_r). Listwise baselines: dpo-pl "
                        "(Plackett-Luce), nca-rw / nca-pref (NCA), lipo (LiPO-lambda), ipo (IPO), simpo (SimPO, "
                        "no reference model); README: The objective")
    g.add_argument("--num_contrastive", type=int, default=2,
                   help="K, candidates per group; a record's C candidates form C/K consecutive groups")
    g.add_argument("--beta_pi", type=float, default=0.5, help="scale of the policy's log-ratio h in q = softmax(beta_pi h)")
    g.add_argument("--beta_r", type=float, default=0.5, help="temperature of the rewards in p = softmax(r / beta_r)")
    g.add_argument("--temp", type=float, default=1.0,
                   help="sampling temperature tau: policy and reference logits are divided by it")
    g.add_argument("--pref_epsilon", type=float, default=None,
                   help="label smoothing eps of -pref targets; default 1e-3 for EXO, 0 (one-hot) for DPO and NCA")
    g.add_argument("--simpo_margin", type=float, default=DEFAULT_SIMPO_MARGIN,
                   help="simpo only: the target margin gamma in -log sigmoid(beta_pi (s_w - s_l) - gamma), s the "
                        "per-token average log-prob (the SimPO authors' gamma_beta_ratio is gamma / beta_pi)")
    g.add_argument("--lipo_labels", default="rewards", choices=["rewards", "win_rates"],
                   help="lipo only: the labels psi whose gains 2^psi - 1 weigh the pairs. rewards: the data's "
                        "rewards as given (a group of mostly negative ones is refused); win_rates: each candidate's "
                        "mean sigmoid(r_i - r_j) over the others of its group, in (0, 1) for any reward model")
    g.add_argument("--ref_logps", default="cached", choices=["cached", "online"],
                   help="cached: one reference pass before training, stored beside the data cache; "
                        "online: keep the reference in memory and run it every step")
    add_fused_logprobs_arg(g)
    add_prefix_sharing_arg(g)
    args = parser.parse_args(argv)
    check_training_args(args)
    args.ref_name_or_path = args.ref_name_or_path or args.model_name_or_path
    if LOSSES[args.loss_type].reference and args.ref_name_or_path != args.model_name_or_path:
        check_position_limit(args.ref_name_or_path, args.max_seq_len, "--max_seq_len", args.trust_remote_code)
    args.pref_epsilon = resolve_pref_epsilon(args.loss_type, args.pref_epsilon)
    if args.num_contrastive < 2:
        raise InputError(f"--num_contrastive {args.num_contrastive}: contrasting needs at least 2 candidates")
    if args.loss_type.endswith("-pref") and not 0 <= args.pref_epsilon < 1:
        raise InputError(f"--pref_epsilon {args.pref_epsilon}: must be in [0, 1)")
    if args.loss_type.startswith("exo") and args.loss_type.endswith("-pref") and args.pref_epsilon <= 0:
        raise InputError("--pref_epsilon 0 with exo-pref: KL(q || p) is infinite where p = 0; use eps > 0")
    if args.beta_pi <= 0 or args.beta_r <= 0 or args.temp <= 0:
        raise InputError("--beta_pi, --beta_r and --temp must be positive")
    return args


def alignment_metrics(policy_logps, ref_logps, rewards, beta_pi, lengths=None):
    """What the run is doing, in the names TRL uses where they exist ([G, K] inputs).

    rewards/chosen, rewards/rejected: implicit reward beta_pi * h of the best- and
    worst-labelled candidate (for every loss with a reference, so they compare across losses;
    without one, SimPO's beta_pi * log pi_theta(y | x) / |y|); rewards/accuracies: how often the
    policy ranks the best-labelled candidate strictly above every other; kl (with a reference):
    sum over y of e^h h - e^h + 1, an unbiased non-negative estimate of KL(pi || pi_ref) when the
    candidates were sampled from pi_ref (per sequence).
    """
    if ref_logps is None:
        score = policy_logps.double() / lengths
    else:
        score = (policy_logps - ref_logps).double()
    best, worst = rewards.argmax(-1, keepdim=True), rewards.argmin(-1, keepdim=True)
    chosen = beta_pi * score.gather(-1, best).squeeze(-1)
    rejected = beta_pi * score.gather(-1, worst).squeeze(-1)
    # Strictly above every other candidate, as TRL's chosen > rejected: at step 0 h is 0
    # everywhere, and an argmax would break the tie towards the first (often the chosen) one.
    others = score.scatter(-1, best, float("-inf")).amax(-1)
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (score.gather(-1, best).squeeze(-1) > others).double().mean(),
        "logps/policy": policy_logps.mean(),
    }
    if ref_logps is not None:
        ratio = score.clamp(max=50).exp()
        metrics["kl"] = (ratio * score - ratio + 1).mean()
    return metrics


def alignment_step_loss(model, batch, args, ref_model=None, policy_shares_prompt=False, ref_shares_prompt=False):
    """(loss, metrics) of one collated batch of groups: one policy forward over all B * K
    candidates; the reference's log-probs come from the batch (cached), from `ref_model`, or
    nowhere (a reference-free loss). `policy_shares_prompt`, `ref_shares_prompt`: whether the
    policy and the reference encode each prompt once (utils.prefix_sharing)."""
    groups = batch["rewards"].shape[0]
    policy_logps = model_sequence_logprobs(model, batch, args.temp, args.fused_logprobs, policy_shares_prompt)
    policy_logps = policy_logps.view(groups, args.num_contrastive)
    lengths = batch["loss_mask"].sum(-1).view(groups, args.num_contrastive).to(policy_logps.dtype)
    if not LOSSES[args.loss_type].reference:
        ref_logps = None
    elif "ref_logps" in batch:
        ref_logps = batch["ref_logps"]
    else:
        with torch.no_grad():
            ref_logps = model_sequence_logprobs(ref_model, batch, args.temp, args.fused_logprobs, ref_shares_prompt)
            ref_logps = ref_logps.view(groups, args.num_contrastive)
    labels = batch["rewards"]
    if args.loss_type == "lipo" and args.lipo_labels == "win_rates":
        labels = win_rate_labels(labels.double()).to(labels.dtype)
    loss = alignment_loss(policy_logps, ref_logps, labels, args.loss_type, args.beta_pi,
                          args.beta_r, args.pref_epsilon, lengths=lengths, margin=args.simpo_margin)
    return loss, alignment_metrics(policy_logps.detach(), ref_logps, batch["rewards"], args.beta_pi, lengths)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    setup = TrainingSetup(args)
    tokenizer, device = setup.tokenizer, setup.device
    loss = LOSSES[args.loss_type]
    pref_labels = loss.labels == "pref"
    encoding = {"stage": "align", "num_contrastive": args.num_contrastive, "pref_labels": pref_labels}
    group_check = None
    if loss.checks_labels and args.lipo_labels == "rewards":  # a cached encoding was checked only if its key says so
        encoding["labels_checked_for"] = args.loss_type
        group_check = partial(label_error, args.loss_type)

    def make_encoder(tokenisation, source, kind):
        return AlignmentEncoder(tokenisation, source, kind, args.num_contrastive, pref_labels, group_check)

    splits = setup.datasets(encoding, make_encoder)
    collator = AlignmentCollator(tokenizer.pad_token_id)

    ref_engine, ref_sharing = None, False

    def reference():
        nonlocal ref_engine, ref_sharing
        if ref_engine is None:
            ref = load_causal_lm(args.ref_name_or_path, tokenizer, args.dtype, args.trust_remote_code,
                                 disable_dropout=True)
            ref_sharing = resolve_prefix_sharing(args.prefix_sharing, ref, "the reference")
            ref_engine, *_ = deepspeed.initialize(model=ref, config=eval_ds_config(args, setup.world_size))
            ref_engine.eval()
        return ref_engine, ref_sharing

    cache_reference = loss.reference and args.ref_logps == "cached"
    datasets_ = {}
    for split, (dataset, data_key) in splits.items():
        if cache_reference:
            values = cached_reference_logps(reference, dataset, data_key, collator, args, device)
            dataset = dataset.add_column("ref_logps", values.tolist())
        datasets_[split] = dataset
    if cache_reference:
        ref_engine = None  # frees the reference: from here on alignment costs what SFT does
        gc.collect()
    elif loss.reference:
        reference()

    policy = load_causal_lm(args.model_name_or_path, tokenizer, args.dtype, args.trust_remote_code, disable_dropout=True)
    if args.lora_dim > 0:
        policy = apply_lora(policy, args.lora_dim, args.lora_alpha, args.lora_module_name, args.only_optimize_lora)
    policy_sharing = resolve_prefix_sharing(args.prefix_sharing, policy, "the policy")

    def compute_loss(model, batch):
        return alignment_step_loss(model, batch, args, ref_engine, policy_sharing, ref_sharing)

    # closing: which batches --prefix_sharing auto packed (rank 0's, the reference pass included)
    train(args, policy, tokenizer, datasets_["train"], datasets_["test"], collator, compute_loss, device,
          closing_note=sharing_summary)


if __name__ == "__main__":
    run_and_exit(main)
