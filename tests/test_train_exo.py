"""The alignment stage end to end: real DeepSpeed on 2 CPU ranks (ZeRO-2 and ZeRO-3), the
launcher, LoRA export, the reference-log-prob cache, and one-line errors for bad input."""
import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, forked_runs, launcher, run, train_losses, write_split
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TINY_FLAGS = ["--max_seq_len", "48", "--max_gen_len", "16", "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "8", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
              "--seed", "7"]


def eval_losses(stdout):
    """{step: eval loss} from the `[eval step N] loss=...` lines."""
    return {int(s): float(v) for s, v in re.findall(r"\[eval step (\d+)\] loss=([-\d.e]+)", stdout)}


def train_exo(model, data_name_path, out, cache, *flags, ranks=2):
    cmd = [*launcher(ranks), "src/train_exo.py", "--model_name_or_path", model, "--data_name_path", data_name_path,
           "--output_dir", str(out), "--data_output_path", str(cache), *TINY_FLAGS, *flags]
    result = run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,loss_type,kind", [(2, "exo-rw", "rw"), (3, "dpo-pref", "pref")])
def test_two_rank_training_lowers_the_loss_and_exports_loadable_checkpoints(
        tiny_model, align_data, tmp_path, zero_stage, loss_type, kind):
    """2 CPU ranks under ZeRO-2/3: eval loss falls, ckpt1..N and the final model load with transformers."""
    out = tmp_path / "run"
    result = train_exo(tiny_model, f"toy/{kind}:{align_data[kind]}", out, tmp_path / "cache",
                       "--zero_stage", str(zero_stage), "--loss_type", loss_type, "--num_contrastive", "2",
                       "--num_train_epochs", "3", "--num_save_checkpoint", "2")
    losses = eval_losses(result.stdout)
    first, last = losses[0], losses[max(losses)]
    assert last < first - 0.05, f"eval loss did not fall: {losses}"

    initial = weights(tiny_model)
    for path in (out / "ckpt1", out / "ckpt2", out):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert sum(p.numel() for p in model.parameters()) > 0
        saved = weights(path)
        assert saved.keys() == initial.keys()
        assert all(saved[k].shape == initial[k].shape for k in saved)  # ZeRO-3: gathered, not partitions
        assert max_diff(saved, initial) > 0
    assert max_diff(weights(out / "ckpt2"), weights(out)) == 0  # the last export is the final step
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.slow
def test_cached_reference_logps_match_the_online_reference(tiny_model, align_data, tmp_path):
    """Reference log-probs computed on 2 ranks and reassembled equal a direct pass, candidate by
    candidate, and give the same losses as running the reference online."""
    import datasets
    from utils.data.collators import AlignmentCollator
    from utils.logprobs import model_sequence_logprobs
    from utils.model_utils import load_tokenizer

    data = f"toy/rw:{align_data['rw']}"
    common = ["--zero_stage", "2", "--loss_type", "exo-rw", "--num_contrastive", "4", "--max_iter_step", "2",
              "--print_loss"]
    cached = train_exo(tiny_model, data, tmp_path / "cached", tmp_path / "cache", *common)
    online = train_exo(tiny_model, data, tmp_path / "online", tmp_path / "cache", *common, "--ref_logps", "online")

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    collator = AlignmentCollator(load_tokenizer(tiny_model).pad_token_id)
    cache_files = sorted(os.listdir(tmp_path / "cache"))
    ref_files = [f for f in cache_files if f.startswith("ref_logps_")]
    assert len(ref_files) == 2  # train and test
    for split in ("train", "test"):
        dataset = datasets.load_from_disk(tmp_path / "cache" / next(f for f in cache_files if f"_{split}_" in f))
        with torch.no_grad():
            direct = torch.stack([model_sequence_logprobs(model, collator([dataset[i]])) for i in range(len(dataset))])
        stored = [np.load(tmp_path / "cache" / f) for f in ref_files]
        match = [s for s in stored if s.shape == tuple(direct.shape)]
        assert match, (split, [s.shape for s in stored])
        np.testing.assert_allclose(match[0], direct.numpy(), atol=1e-4, rtol=0)

    # Before the first update both runs see the same policy: losses must agree. (Later steps
    # may not: Adam turns float32 noise on near-zero gradients into lr-sized steps.)
    assert eval_losses(cached.stdout)[0] == pytest.approx(eval_losses(online.stdout)[0], rel=1e-3)
    assert train_losses(cached.stdout)[1] == pytest.approx(train_losses(online.stdout)[1], rel=1e-3)


@pytest.mark.slow
def test_lora_training_exports_a_merged_plain_model(tiny_model, align_data, tmp_path):
    """--lora_dim with --only_optimize_lora trains adapters and exports them merged into a plain HF model."""
    out = tmp_path / "lora"
    train_exo(tiny_model, f"toy/pref:{align_data['pref']}", out, tmp_path / "cache", "--loss_type", "exo-pref",
              "--lora_dim", "4", "--only_optimize_lora", "--max_iter_step", "4", ranks=1)
    saved, initial = weights(out), weights(tiny_model)
    assert saved.keys() == initial.keys() and not any("lora" in k for k in saved)
    changed = {k for k in saved if not torch.equal(saved[k], initial[k])}
    assert changed and all(k.endswith(".weight") and ".h." in k for k in changed)  # only adapted layers moved


def test_merge_lora_reproduces_the_adapted_model(tiny_model):
    """The merged export computes the same logits as the peft model it came from."""
    from utils.model_utils import _merge_lora, apply_lora

    torch.manual_seed(0)
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), lora_dim=4, lora_alpha=8)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at 0: make the adapters do something
    merged = AutoModelForCausalLM.from_pretrained(tiny_model)
    merged.load_state_dict(_merge_lora(peft_model, peft_model.state_dict()), strict=False)
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def _bad_rw(tmp_path, mutate):
    records = [{"prompt": "the movie", "completions": ["good fun", "bad", "great", "dull"],
                "rewards": [2.0, -1.0, 1.0, -0.5]} for _ in range(4)]
    mutate(records)
    directory = tmp_path / "bad"
    write_split(directory, "train", records)
    write_split(directory, "test", records)
    return f"bad/rw:{directory}"


BAD_INPUTS = {
    "missing data dir": (lambda t: "x/rw:/nonexistent/dir", [],
                         r"no train\.json, train\.jsonl, train\.parquet or save_to_disk folder"),
    "no colon": (lambda t: "x/rw", [], r"expected NAME/KIND:PATH"),
    "unknown dataset": (lambda t: f"imdb:{t}", [], r"unknown dataset 'imdb' \(registered: "),
    "unknown loss": (lambda t: _bad_rw(t, lambda r: None), ["--loss_type", "kto"], r"invalid choice: 'kto'"),
    "C not multiple of K": (lambda t: _bad_rw(t, lambda r: None), ["--num_contrastive", "3"],
                            r"record 0 field \"completions\": 4 candidates is not a multiple of --num_contrastive 3"),
    "K above C": (lambda t: _bad_rw(t, lambda r: None), ["--num_contrastive", "8"], r"fewer than --num_contrastive 8"),
    "non-finite reward": (lambda t: _bad_rw(t, lambda r: r[2]["rewards"].__setitem__(1, float("nan"))), [],
                          r"record 2 field \"rewards\"\[1\]: non-finite reward"),
    "mistyped field": (lambda t: _bad_rw(t, lambda r: r[1].__setitem__("prompt", 5)), [],
                       r"record 1 field \"prompt\": expected str, got int"),
    "missing field": (lambda t: _bad_rw(t, lambda r: r[3].pop("rewards")), [], r"record 3 field \"rewards\": missing field"),
    "tie in pref mode": (lambda t: _bad_rw(t, lambda r: r[0]["rewards"].__setitem__(1, 2.0)),
                         ["--loss_type", "dpo-pref"], r"record 0 field \"rewards\": candidates 0\.\.1 tie"),
    "exo-pref with eps 0": (lambda t: _bad_rw(t, lambda r: None), ["--loss_type", "exo-pref", "--pref_epsilon", "0"],
                            r"KL\(q \|\| p\) is infinite"),
    "model is not a model": (lambda t: _bad_rw(t, lambda r: None), ["--model_name_or_path", "{tmp}"], r"cannot load"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, tmp_path_factory):
    """{case: (CompletedProcess, its directory)}: every BAD_INPUTS case, each a process of its own
    forked from one that imported train_exo's imports once (helpers.forked_runs)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    argvs, dirs = [], []
    for i, (make_data, flags, _) in enumerate(BAD_INPUTS.values()):
        case_dir = root / f"case{i}"
        case_dir.mkdir()
        argvs.append(["src/train_exo.py", "--model_name_or_path", tiny_model, "--data_name_path", make_data(case_dir),
                      "--output_dir", str(case_dir / "out"), "--data_output_path", str(case_dir / "cache"),
                      "--loss_type", "exo-rw", "--num_contrastive", "2", "--max_seq_len", "64", "--max_gen_len", "16",
                      *[f.format(tmp=case_dir) for f in flags]])
        dirs.append(case_dir)
    return dict(zip(BAD_INPUTS, zip(forked_runs(root / "forked", argvs), dirs)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(bad_input_runs, case):
    """Each bad input: exit 2, one `error:` line naming what is wrong, no traceback, no output dir."""
    pattern = BAD_INPUTS[case][2]
    result, case_dir = bad_input_runs[case]
    out = case_dir / "out"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_pref_to_rw_output_trains_with_rw_losses(tiny_model, align_data, tmp_path):
    """pref -> rw conversion gives data the rw losses accept, with rewards [1, 0]."""
    import shutil

    pref_dir = tmp_path / "toy_pref"
    shutil.copytree(align_data["pref"], pref_dir)
    result = run(["python", "src/utils/data/pref_to_rw.py", str(pref_dir)])
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "toy_pref_p2r" / "train.json") as f:
        records = json.load(f)
    assert {tuple(r["rewards"]) for r in records} == {(1.0, 0.0)}
    train_exo(tiny_model, f"toy/rw:{tmp_path / 'toy_pref_p2r'}", tmp_path / "out", tmp_path / "cache",
              "--loss_type", "dpo-rw", "--max_iter_step", "2", ranks=1)


def test_readme_documents_the_test_command():
    """.ci/run runs exactly the README's test commands: the main suite's and the vLLM tests'."""
    readme = (REPO_ROOT / "README.md").read_text()
    for marker in ("test-command", "vllm-test-command"):
        command = re.search(rf"<!-- {marker} -->\s*```(?:bash)?\n(.+?)\n```", readme, re.S).group(1).strip()
        assert command in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_alignment_models_run_without_dropout(tmp_path, arch):
    """Policy and reference load with every dropout off, so h = log pi - log pi_ref is noise-free
    in train mode (GPT-2 names its rates *_pdrop, Llama attention_dropout)."""
    from utils.tiny_model import make_tiny_model
    from transformers import AutoConfig
    from utils.model_utils import load_causal_lm, load_tokenizer

    path = make_tiny_model(str(tmp_path / arch), ["a tiny corpus of words"] * 8, arch=arch)
    config = AutoConfig.from_pretrained(path)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.5)
    config.save_pretrained(path)
    model = load_causal_lm(path, load_tokenizer(path), disable_dropout=True).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("flags,dtype", [(["--gradient_checkpointing"], torch.float32),
                                         (["--dtype", "bf16"], torch.bfloat16)])
@pytest.mark.slow
def test_single_process_precision_and_checkpointing_options(tiny_model, align_data, tmp_path, flags, dtype):
    """Plain `python src/train_exo.py` with activation checkpointing or bf16 trains and exports in that dtype."""
    train_exo(tiny_model, f"toy/rw:{align_data['rw']}", tmp_path / "out", tmp_path / "cache", "--loss_type", "exo-rw",
              "--max_iter_step", "2", *flags, ranks=1)
    assert {t.dtype for t in weights(tmp_path / "out").values()} == {dtype}


def test_accuracy_counts_only_a_strict_win_of_the_best_labelled_candidate():
    from train_exo import alignment_metrics

    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    same = torch.zeros(2, 3)
    # at the start policy == reference: every h ties, so no group is ranked right yet
    assert alignment_metrics(same, same, rewards, 0.1)["rewards/accuracies"] == 0
    policy = torch.tensor([[2.0, 1.0, 2.0], [0.0, 3.0, 1.0]])  # group 0 ties at the top, group 1 wins
    assert alignment_metrics(policy, same, rewards, 0.1)["rewards/accuracies"] == 0.5


@pytest.mark.slow
def test_reference_cache_is_keyed_on_the_sharing_mode(tiny_model, align_data, tmp_path):
    """A change of --prefix_sharing recomputes the cached reference log-probs (shared and
    unshared values agree only to float precision, and not at all where auto would share
    inexactly)."""
    from train_exo import parse_args
    from utils.reference_logps import reference_cache_path

    base = ["--model_name_or_path", tiny_model, "--data_name_path", f"toy/rw:{align_data['rw']}",
            "--output_dir", str(tmp_path / "out"), "--data_output_path", str(tmp_path / "cache"), *TINY_FLAGS]
    paths = {mode: reference_cache_path(parse_args(base + ["--prefix_sharing", mode]), "data")
             for mode in ("auto", "on", "off")}
    assert len(set(paths.values())) == 3
    assert reference_cache_path(parse_args(base), "data") == paths["auto"]  # the default
    assert reference_cache_path(parse_args(base), "other data") != paths["auto"]

    common = ["--loss_type", "exo-rw", "--num_contrastive", "4", "--max_iter_step", "1"]
    for mode in ("auto", "off"):
        train_exo(tiny_model, f"toy/rw:{align_data['rw']}", tmp_path / mode, tmp_path / "cache", *common,
                  "--prefix_sharing", mode, ranks=1)
    ref_files = [f for f in os.listdir(tmp_path / "cache") if f.startswith("ref_logps_")]
    assert len(ref_files) == 4  # train and test, for auto and for off
