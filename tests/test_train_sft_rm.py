"""The SFT and reward-model stages end to end: SFT on one process, the RM on 2 CPU ranks
(ZeRO-2) and with LoRA, the loss math, and one-line errors for bad input. Their launchers run in
test_pipeline.py (train_sft.sh on sft data, train_rm.sh) and test_chat.py (train_sft.sh on pref data)."""
import json
import os
import re

import datasets
import pytest
import torch
import torch.nn.functional as F
from helpers import forked_runs, launcher, run, write_split
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from utils.data.collators import PairCollator, SFTCollator
from utils.model_utils import load_reward_model, load_tokenizer

TINY_FLAGS = ["--max_seq_len", "48", "--max_gen_len", "16", "--per_device_train_batch_size", "8",
              "--per_device_eval_batch_size", "8", "--lr_scheduler_type", "constant", "--seed", "7"]


def eval_metrics(stdout):
    """{step: {name: value}} from the `[eval step N] name=value ...` lines."""
    return {int(step): {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", rest)}
            for step, rest in re.findall(r"\[eval step (\d+)\] (.*)", stdout)}


def train_stage(script, model, data_name_path, out, cache, *flags, ranks=1):
    cmd = [*launcher(ranks), f"src/{script}", "--model_name_or_path", model, "--data_name_path", data_name_path,
           "--output_dir", str(out), "--data_output_path", str(cache), *TINY_FLAGS, *flags]
    result = run(cmd, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def cached_split(cache, split):
    """The tokenised `split` a stage cached under `cache` (one dataset per run here)."""
    (name,) = [n for n in os.listdir(cache) if f"_{split}_" in n]
    return datasets.load_from_disk(os.path.join(cache, name))


@pytest.fixture(scope="module")
def sft_data(align_data, tmp_path_factory):
    """sft records: the prompts and chosen completions of align_data's pref set."""
    directory = tmp_path_factory.mktemp("sft") / "toy_sft"
    for split in ("train", "test"):
        with open(os.path.join(align_data["pref"], f"{split}.json")) as f:
            write_split(directory, split, [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in json.load(f)])
    return str(directory)


# -- SFT ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_lowers_eval_loss_and_reports_the_token_weighted_perplexity(tiny_model, sft_data, tmp_path):
    """One process: eval loss falls; the logged perplexity is exp(total NLL / total completion
    tokens) of the saved model over the test set, which loads with AutoModelForCausalLM."""
    out, cache = tmp_path / "sft", tmp_path / "cache"
    result = train_stage("train_sft.py", tiny_model, f"toy/sft:{sft_data}", out, cache,
                         "--learning_rate", "5e-3", "--num_train_epochs", "2")
    metrics = eval_metrics(result.stdout)
    first, last = metrics[0], metrics[max(metrics)]
    assert last["loss"] < first["loss"] - 0.5, metrics
    assert last["perplexity"] < first["perplexity"]

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    collator = SFTCollator(load_tokenizer(str(out)).pad_token_id)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for example in cached_split(cache, "test"):
            batch = collator([example])
            logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
            mask = batch["loss_mask"][0, 1:].bool()
            nll += F.cross_entropy(logits[mask], batch["input_ids"][0, 1:][mask], reduction="sum").item()
            tokens += int(mask.sum())
    assert last["perplexity"] == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=2e-3)


def test_sft_loss_is_the_mean_nll_of_the_trained_tokens(tiny_model):
    """sft_loss = summed NLL / number of trained tokens over the micro batch (token-weighted);
    --train_on_prompt moves the mask onto the prompt (all but its first token)."""
    from train_sft import perplexity, sft_loss

    tokenizer = load_tokenizer(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    examples = [{"input_ids": [5, 6, 7, 8, 9, 10], "prompt_len": 2}, {"input_ids": [11, 12, 13], "prompt_len": 1}]
    for train_on_prompt, trained in ((False, [[2, 3, 4, 5], [1, 2]]), (True, [[1, 2, 3, 4, 5], [1, 2]])):
        batch = SFTCollator(tokenizer.pad_token_id, train_on_prompt)(examples)
        with torch.no_grad():
            loss, metrics = sft_loss(model, batch)
            logps = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
        expected = [-logps[row, t - 1, examples[row]["input_ids"][t]] for row, ts in enumerate(trained) for t in ts]
        assert int(metrics["num_tokens"]) == len(expected)
        torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)
    summary = perplexity({"loss": 1.0, "nll_sum": 6.0, "num_tokens": 3.0})
    assert summary == {"loss": 1.0, "perplexity": pytest.approx(torch.e ** 2)}


# -- reward model ---------------------------------------------------------------------------
def test_pair_encoder_tokenises_chosen_and_rejected_by_the_shared_rule(tiny_model, easy_pref_data, tmp_path):
    """PairEncoder: each pref record -> [prompt + chosen + EOS, prompt + rejected + EOS] as
    Tokenisation.join_group makes them (one prompt cut for both); PairCollator lays the pairs out c0, r0, c1, r1, ..."""
    from utils.data.encoders import PairEncoder
    from utils.data.tokenisation import Tokenisation
    from utils.data.tokenised_datasets import build_dataset
    from utils.data.dataset_names import load_raw_datasets

    tokenizer = load_tokenizer(tiny_model)
    tokenisation = Tokenisation(tokenizer, 8, 4)  # short enough that completions and prompts get cut
    raw = load_raw_datasets([f"easy/pref:{easy_pref_data}"])
    dataset, _ = build_dataset(raw, "test", tokenisation, str(tmp_path), {"stage": "rm"}, PairEncoder)
    with open(os.path.join(easy_pref_data, "test.json")) as f:
        records = json.load(f)
    for example, record in zip(dataset, records):
        (prompt,) = tokenisation.prompts([record["prompt"]])
        expected = tokenisation.join_group(prompt, tokenisation.completions([record["chosen"], record["rejected"]]))
        assert example == {"input_ids": [ids for ids, _ in expected], "prompt_lens": [n for _, n in expected]}
    batch = PairCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    rows = [dataset[0]["input_ids"][0], dataset[0]["input_ids"][1], dataset[1]["input_ids"][0]]
    for row, ids in enumerate(rows):
        assert batch["input_ids"][row, :len(ids)].tolist() == ids and batch["attention_mask"][row].sum() == len(ids)


def pair_margins(model, dataset, pad_token_id):
    """r_chosen - r_rejected of every pair, scored the way training batches them."""
    batch = PairCollator(pad_token_id)(list(dataset))
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = rewards.view(-1, 2).T
    return chosen - rejected


@pytest.mark.slow
def test_reward_model_on_two_ranks_beats_chance_and_scores_text_after_loading(tiny_model, easy_pref_data, tmp_path):
    """2 CPU ranks, ZeRO-2: eval accuracy >= 0.85; the export loads with
    AutoModelForSequenceClassification, reproduces the logged margin, and ranks positive text
    above negative text when scored as plain strings with its own tokenizer."""
    out, cache = tmp_path / "rm", tmp_path / "cache"
    result = train_stage("train_rm.py", tiny_model, f"easy/pref:{easy_pref_data}", out, cache, "--zero_stage", "2",
                         "--learning_rate", "2e-3", "--num_train_epochs", "3", ranks=2)
    metrics = eval_metrics(result.stdout)
    first, last = metrics[0], metrics[max(metrics)]
    assert set(last) == {"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    assert last["accuracy"] >= 0.85 and last["accuracy"] > first["accuracy"], metrics
    assert last["loss"] < first["loss"]

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    test = cached_split(cache, "test")
    margins = pair_margins(model, test, model.config.pad_token_id)
    assert margins.mean().item() == pytest.approx(last["margin"], rel=2e-3, abs=1e-3)

    with open(os.path.join(easy_pref_data, "test.json")) as f:
        records = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [f"{r['prompt']} {r[key]}" for key in ("chosen", "rejected") for r in records]
    with torch.no_grad():
        scores = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.squeeze(-1)
    chosen, rejected = scores.view(2, -1)
    assert chosen.mean() > rejected.mean() and (chosen > rejected).float().mean() >= 0.8


@pytest.mark.slow
def test_reward_model_with_lora_exports_the_trained_score_head(tiny_model, easy_pref_data, tmp_path):
    """--lora_dim --only_optimize_lora (peft SEQ_CLS): the score head trains and the export is
    a plain classifier (score.weight, no adapter keys) that reproduces the logged margin."""
    from safetensors.torch import load_file

    out, cache = tmp_path / "rm_lora", tmp_path / "cache"
    result = train_stage("train_rm.py", tiny_model, f"easy/pref:{easy_pref_data}", out, cache, "--lora_dim", "4",
                         "--only_optimize_lora", "--learning_rate", "5e-3", "--max_iter_step", "4")
    last = eval_metrics(result.stdout)
    last = last[max(last)]
    saved = load_file(out / "model.safetensors")
    assert "score.weight" in saved and not any("lora" in k or "modules_to_save" in k or "original_module" in k
                                               for k in saved)
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert saved.keys() == reference.state_dict().keys()
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    margins = pair_margins(model, cached_split(cache, "test"), model.config.pad_token_id)
    assert margins.mean().item() == pytest.approx(last["margin"], rel=2e-3, abs=1e-3)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_reward_model_trains_its_score_head_on_other_backbones(tmp_path, arch):
    """GPT-NeoX and Llama load as one-label classifiers; the pairwise loss reaches the score
    head, which LoRA (peft SEQ_CLS) trains in full while its unused original copy stays frozen."""
    from utils.tiny_model import make_tiny_model
    from train_rm import pairwise_loss
    from utils.model_utils import apply_lora

    path = make_tiny_model(str(tmp_path / arch), ["the movie was good", "the film was dull"] * 4, arch=arch)
    tokenizer = load_tokenizer(path)
    ids = tokenizer("the movie was good")["input_ids"]
    batch = PairCollator(tokenizer.pad_token_id)([{"input_ids": [ids, ids[:3]], "prompt_lens": [1, 1]}] * 2)
    model = apply_lora(load_reward_model(path, tokenizer), 4, task_type="SEQ_CLS")
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    assert frozen and all(".original_module." in name for name in frozen)
    loss, metrics = pairwise_loss(model, batch)
    loss.backward()
    assert set(metrics) == {"accuracy", "margin", "rewards/chosen", "rewards/rejected"}
    (head,) = [p for name, p in model.named_parameters() if "score.modules_to_save" in name]
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_reward_is_read_where_from_pretrained_scorers_read_it(tiny_model):
    """The model has no pad token, so pad = EOS and the EOS appended to completions counts as
    padding: the reward is the score at the last text token, so a text scores the same with
    and without its EOS, alone or right-padded in a batch."""
    tokenizer = load_tokenizer(tiny_model)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    torch.manual_seed(0)
    model = load_reward_model(tiny_model, tokenizer).eval()
    ids = tokenizer("the movie was good fun")["input_ids"]
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids])).logits
        with_eos = model(input_ids=torch.tensor([ids + [eos]])).logits
        pair = {"input_ids": [ids + [eos], ids[:2] + [eos]], "prompt_lens": [1, 1]}
        batch = PairCollator(tokenizer.pad_token_id)([pair])
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
    torch.testing.assert_close(with_eos, alone)
    torch.testing.assert_close(padded, alone[0])


# -- bad input --------------------------------------------------------------------------------
def _pref(tmp_path, mutate, kind="pref"):
    records = [{"prompt": "the movie", "chosen": "good fun", "rejected": "dull"} for _ in range(4)]
    for index, record in enumerate(records):
        mutate(index, record)
    directory = tmp_path / "data"
    write_split(directory, "train", records)
    write_split(directory, "test", records)
    return f"bad/{kind}:{directory}"


BAD_INPUTS = {
    "rm: pref missing rejected": ("train_rm.py", lambda t: _pref(t, lambda i, r: i == 2 and r.pop("rejected")), [],
                                  r"train\.json record 2 field \"rejected\": missing field"),
    "rm: sft data": ("train_rm.py", lambda t: _pref(t, lambda i, r: r.pop("rejected"), "sft"), [],
                     r"a reward model trains on pref data .* got kind 'sft'"),
    "sft: empty chosen": ("train_sft.py", lambda t: _pref(t, lambda i, r: i == 1 and r.update(chosen=""), "sft"), [],
                          r"train\.json record 1 field \"chosen\": empty text"),
    "sft: rw data": ("train_sft.py", lambda t: "x/rw:/nonexistent", [], r"SFT trains on sft data .* got kind 'rw'"),
    "rm: model is not a model": ("train_rm.py", lambda t: _pref(t, lambda i, r: None),
                                 ["--model_name_or_path", "{tmp}"], r"cannot load"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, tmp_path_factory):
    """{case: (CompletedProcess, its directory)}: every BAD_INPUTS case, each a process of its own
    forked from one that imported the entry scripts' imports once (helpers.forked_runs)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    argvs, dirs = [], []
    for i, (script, make_data, flags, _) in enumerate(BAD_INPUTS.values()):
        case_dir = root / f"case{i}"
        case_dir.mkdir()
        argvs.append([f"src/{script}", "--model_name_or_path", tiny_model, "--data_name_path", make_data(case_dir),
                      "--output_dir", str(case_dir / "out"), "--data_output_path", str(case_dir / "cache"),
                      "--max_seq_len", "64", "--max_gen_len", "16", *[f.format(tmp=case_dir) for f in flags]])
        dirs.append(case_dir)
    return dict(zip(BAD_INPUTS, zip(forked_runs(root / "forked", argvs), dirs)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(bad_input_runs, case):
    """Each bad input: exit 2, one `error:` line naming what is wrong, no traceback, nothing written."""
    pattern = BAD_INPUTS[case][3]
    result, case_dir = bad_input_runs[case]
    out, cache = case_dir / "out", case_dir / "cache"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists() and not cache.exists()
