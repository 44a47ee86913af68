"""Conversational records and chat templates, with two tiny tokenizers of our own (a ChatML and a
Llama-3 template in their tokenizer_config.json): exact rendering against apply_chat_template,
the loss mask on the assistant turn, the file formats users have (parquet, save_to_disk,
load_dataset, --data_split_names, --columns), and the pipeline end to end through the launchers
on conversational data (SFT -> sample -> RM -> score -> align on 2 ranks)."""
import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO_ROOT, run
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from utils.tiny_model import make_tiny_model
from utils.data.collators import AlignmentCollator, SFTCollator
from utils.data.encoders import AlignmentEncoder, SFTEncoder
from utils.data.tokenisation import Tokenisation
from utils.data.tokenised_datasets import build_dataset
from utils.data.dataset_names import load_raw_datasets
from utils.fileio import InputError
from utils.model_utils import load_tokenizer

WORDS = "the movie was good great fun bad awful dull plot what about it tell me hi hello brief".split()
SYSTEM = {"role": "system", "content": "Be brief."}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


def conversation(i):
    """A prompt of one or three turns (a system turn leading the even ones) and two answers."""
    question = {"role": "user", "content": f"what about {WORDS[i % len(WORDS)]} the movie?"}
    prompt = [SYSTEM, question] if i % 2 == 0 else \
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, question]
    return prompt, {"role": "assistant", "content": "good fun great"}, {"role": "assistant", "content": "awful dull"}


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory):
    """{"chatml": dir, "llama3": dir}: tiny Llama models whose tokenizers carry the template."""
    root = tmp_path_factory.mktemp("chat_models")
    texts = [" ".join(WORDS)] * 4 + ["Be brief. what about the movie? good fun great awful dull hello hi"] * 4
    return {style: make_tiny_model(str(root / style), texts, arch="llama", hidden_size=32, num_layers=1,
                                   chat_template=style)
            for style in ("chatml", "llama3")}


def write_parquet(directory, split, rows):
    os.makedirs(directory, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(directory, f"{split}.parquet"))


@pytest.fixture(scope="session")
def chat_pref(tmp_path_factory):
    """Conversational pref data as parquet with the Hub's split names and a renamed prompt column."""
    directory = str(tmp_path_factory.mktemp("chat_pref") / "pref")
    for split, n in (("train_prefs", 32), ("test_prefs", 8)):
        rows = []
        for i in range(n):
            prompt, chosen, rejected = conversation(i)
            rows.append({"question": prompt, "chosen": [chosen], "rejected": "awful dull"})  # both completion shapes
        write_parquet(directory, split, rows)
    return directory


# -- rendering --------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_prompt_plus_completion_is_the_whole_conversation_token_for_token(chat_models, style):
    tokenizer = AutoTokenizer.from_pretrained(chat_models[style])
    tokenisation = Tokenisation(tokenizer, 256, 64)
    end_id = tokenizer.convert_tokens_to_ids(END[style])
    assert tokenisation.chat.turn_end_id == end_id and end_id != tokenizer.eos_token_id
    for i in range(4):  # with a system turn, and multi-turn
        prompt, chosen, _ = conversation(i)
        prompt_ids, = tokenisation.prompts([prompt])
        completion_ids, = tokenisation.completions([chosen], [prompt])
        whole = tokenizer.apply_chat_template(prompt + [chosen], tokenize=True)["input_ids"]
        generation = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert prompt_ids == generation
        assert prompt_ids + completion_ids == whole[:len(prompt_ids) + len(completion_ids)]
        assert completion_ids[-1] == end_id and tokenizer.eos_token_id not in completion_ids  # no EOS after it
        # what is left is the template's separator before a next turn: ChatML's newline, none for Llama 3
        assert tokenizer.decode(whole[len(prompt_ids) + len(completion_ids):]) == ("\n" if style == "chatml" else "")
        assert tokenizer.decode(completion_ids) == "good fun great" + END[style]


def test_text_records_keep_todays_rule_with_a_chat_tokenizer(chat_models):
    tokenizer = AutoTokenizer.from_pretrained(chat_models["chatml"])
    tokenisation = Tokenisation(tokenizer, 256, 64)
    assert tokenisation.prompts(["the movie"]) == [tokenizer("the movie")["input_ids"]]
    text_ids = tokenizer(" good", add_special_tokens=False)["input_ids"]
    assert tokenisation.completions([" good"]) == [text_ids + [tokenizer.eos_token_id]]


def test_loss_mask_is_exactly_the_assistant_turn(chat_models, chat_pref, tmp_path):
    tokenizer = load_tokenizer(chat_models["chatml"])
    tokenisation = Tokenisation(tokenizer, 256, 64)
    raw = load_raw_datasets([f"c/pref:{chat_pref}"], split_names=("train_prefs", "test_prefs"),
                            columns="prompt=question")
    dataset, _ = build_dataset(raw, "train", tokenisation, str(tmp_path), {"stage": "sft"}, SFTEncoder)
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    for row in range(4):
        trained = batch["input_ids"][row][batch["loss_mask"][row].bool()].tolist()
        assert tokenizer.decode(trained) == "good fun great<|im_end|>"
        prompt = batch["input_ids"][row][:dataset[row]["prompt_len"]].tolist()
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    # alignment: each candidate its own assistant turn, the rejected one given as a plain string
    dataset, _ = build_dataset(raw, "train", tokenisation, str(tmp_path), {"stage": "align"},
                               lambda t, s, k: AlignmentEncoder(t, s, k, 2, True))
    batch = AlignmentCollator(tokenizer.pad_token_id)([dataset[0]])
    assert [tokenizer.decode(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["loss_mask"])] \
        == ["good fun great<|im_end|>", "awful dull<|im_end|>"]


def test_a_long_conversation_is_cut_on_the_left_keeping_the_templates_bos(chat_models):
    tokenizer = AutoTokenizer.from_pretrained(chat_models["llama3"])
    tokenisation = Tokenisation(tokenizer, 24, 8)
    prompt, chosen, _ = conversation(1)
    ids, prompt_len = tokenisation.join(tokenisation.prompts([prompt])[0],
                                        tokenisation.completions([chosen], [prompt])[0])
    assert len(ids) <= 24 and ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")


def test_chat_template_none_and_a_template_file(chat_models, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_models["chatml"])
    prompt, chosen, _ = conversation(0)
    with pytest.raises(InputError, match="--chat_template none"):
        Tokenisation(tokenizer, 256, 64, "none").check_conversation({"prompt": prompt, "chosen": chosen}, "sft", "d", 0)
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    tokenisation = Tokenisation(tokenizer, 256, 64, str(template))
    assert tokenizer.decode(tokenisation.prompts([prompt])[0]).endswith("user: what about the the movie?\nassistant:")
    # this template ends a turn with no special token: EOS closes the completion, as for text
    completion = tokenisation.completions([{"role": "assistant", "content": " ok"}], [prompt])[0]
    assert completion[-1] == tokenizer.eos_token_id


def test_a_template_that_reads_the_date_renders_the_same_on_every_day(chat_models, tmp_path, monkeypatch):
    """Llama 3.2/3.3 put today's date (strftime_now) in the system header: rendered with
    --chat_template_date (fixed by default) instead, and the cache key covers it."""
    import datetime

    import transformers.utils.chat_template_utils as chat_utils

    tokenizer = AutoTokenizer.from_pretrained(chat_models["llama3"])
    template = tmp_path / "dated.jinja"
    template.write_text("{{ 'Today Date: ' + strftime_now('%d %b %Y') + '\n' }}"
                        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    prompt, _, _ = conversation(1)
    default = Tokenisation(tokenizer, 256, 64, str(template))
    assert tokenizer.decode(default.prompts([prompt])[0]).startswith("Today Date: 26 Jul 2024")

    class Tomorrow(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 1, 2)
    monkeypatch.setattr(chat_utils, "datetime", Tomorrow)  # what transformers' own strftime_now reads
    chat_utils._compile_jinja_template.cache_clear()
    again = Tokenisation(tokenizer, 256, 64, str(template))
    assert again.prompts([prompt]) == default.prompts([prompt])
    assert again.settings_fingerprint() == default.settings_fingerprint()
    other = Tokenisation(tokenizer, 256, 64, str(template), "2025-03-01")
    assert tokenizer.decode(other.prompts([prompt])[0]).startswith("Today Date: 01 Mar 2025")
    assert other.settings_fingerprint() != default.settings_fingerprint()
    with pytest.raises(InputError, match="--chat_template_date 'tomorrow': expected a date YYYY-MM-DD"):
        Tokenisation(tokenizer, 256, 64, str(template), "tomorrow")


# -- the files users have ---------------------------------------------------------------------
def test_every_file_format_reads_the_same_records(tmp_path):
    answer = {"train": {"role": "assistant", "content": "a"}, "test": {"role": "assistant", "content": "b"}}
    prompts = {"train": [SYSTEM, {"role": "user", "content": "q"}], "test": [{"role": "user", "content": "q2"}]}
    records = {s: [{"prompt": prompts[s], "chosen": [answer[s]]}] for s in ("train", "test")}  # the Hub's shape
    expect = {s: [{"prompt": prompts[s], "chosen": answer[s]}] for s in ("train", "test")}
    jsonl, parquet, disk, per_split, hub = (tmp_path / n for n in ("jsonl", "parquet", "disk", "split", "hub"))
    for split, rows in records.items():
        jsonl.mkdir(exist_ok=True)
        (jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_parquet(parquet, split, rows)
        datasets.Dataset.from_list(rows).save_to_disk(str(per_split / split))
        write_parquet(hub / "data", f"{split}_sft", rows)
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in records.items()}).save_to_disk(str(disk))
    # a Hub-style repository: its README declares the splits, read by datasets.load_dataset
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_sft\n"
                                   "    path: data/train_sft.parquet\n  - split: test_sft\n"
                                   "    path: data/test_sft.parquet\n---\n")
    for path, split_names in ((jsonl, None), (parquet, None), (disk, None), (per_split, None),
                              (hub, ("train_sft", "test_sft"))):
        (raw,) = load_raw_datasets([f"x/sft:{path}"], split_names=split_names)
        assert {s: raw.records(s) for s in ("train", "test")} == expect, path
        assert raw.data_files("train") or path == hub


def test_columns_map_fields_and_a_bad_mapping_is_one_line(tmp_path):
    write_parquet(tmp_path / "d", "train", [{"q": "p", "good": "c", "bad": "r"}])
    (raw,) = load_raw_datasets([f"x/pref:{tmp_path / 'd'}"], columns="prompt=q,chosen=good,rejected=bad")
    assert raw.records("train") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    with pytest.raises(InputError, match=r"train\.parquet: no column 'question' \(--columns prompt=question\)"):
        load_raw_datasets([f"x/pref:{tmp_path / 'd'}"], columns="prompt=question")[0].records("train")
    with pytest.raises(InputError, match="'answer' is not a field"):
        load_raw_datasets([f"x/pref:{tmp_path / 'd'}"], columns="answer=good")
    with pytest.raises(InputError, match=r"field 'prompt' is given twice \(prompt=q and prompt=good\)"):
        load_raw_datasets([f"x/pref:{tmp_path / 'd'}"], columns="prompt=q,prompt=good")
    with pytest.raises(InputError, match=r"^--columns completions=typo: x/pref is pref data, which has no field "
                                         r"'completions'"):
        load_raw_datasets([f"x/pref:{tmp_path / 'd'}"], columns="prompt=q,completions=typo")


@pytest.mark.slow
def test_pref_to_rw_keeps_conversations(chat_pref, tmp_path):
    os.makedirs(tmp_path / "pref")
    for ours, theirs in (("train", "train_prefs"), ("test", "test_prefs")):
        rows = pq.read_table(os.path.join(chat_pref, f"{theirs}.parquet")).to_pylist()
        write_parquet(tmp_path / "pref", ours, [{"prompt": r["question"], **{k: r[k] for k in ("chosen", "rejected")}}
                                                for r in rows])
    result = run(["python", "src/utils/data/pref_to_rw.py", str(tmp_path / "pref")])
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "pref_p2r" / "train.json").read_text())[0]
    assert record == {"prompt": conversation(0)[0], "completions": [{"role": "assistant", "content": "good fun great"},
                                                                    {"role": "assistant", "content": "awful dull"}],
                      "rewards": [1.0, 0.0]}


def test_get_raw_dataset_takes_an_entry_added_by_hand(tmp_path):
    """The seed's way: two lines added to get_raw_dataset in dataset_names.py name a new dataset."""
    source = (REPO_ROOT / "src" / "utils" / "data" / "dataset_names.py").read_text()
    marker = "    # -- datasets added by hand go here --\n"
    assert marker in source
    edited = source.replace(marker, marker + "    if name == 'my_tsv':\n"
                                             "        dataset = MyTsv(name, path, kind or None)\n")
    # run as a module of the utils.data package, so its relative imports resolve as the original's do
    module = {"__name__": "utils.data.edited_dataset_names", "__package__": "utils.data"}
    exec(compile(edited, "dataset_names.py", "exec"), module)

    from utils.data.raw_datasets import PromptRawDataset

    class MyTsv(PromptRawDataset):
        kind = "pref"

        def load_split(self, split):
            return [line.split("\t") for line in open(f"{self.path}/{split}.tsv").read().splitlines()]

        def get_prompt(self, sample): return sample[0]
        def get_chosen(self, sample): return sample[1]
        def get_rejected(self, sample): return sample[2]

    module["MyTsv"] = MyTsv
    (tmp_path / "train.tsv").write_text("p\tc\tr\n")
    dataset = module["get_raw_dataset"]("my_tsv", str(tmp_path))
    assert isinstance(dataset, MyTsv) and dataset.records("train") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


@pytest.mark.slow
def test_recipe_launchers_give_exo_pref_the_original_target(tmp_path):
    """exo-pref in the paper recipes: eps = sigmoid(-10) at K = 2 (the original code's log eps -10)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "deepspeed").write_text('#!/bin/bash\necho "$@" >> "$FAKE_OUT"\n')
    (fake / "deepspeed").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FAKE_OUT": str(tmp_path / "argv"), "DEVICE_IDS": "0,1",
           "OUTPUT_ROOT": str(tmp_path / "models")}
    for recipe, loss, k in (("imdb", "exo-pref", 2), ("tldr", "exo-pref", 4), ("hh", "dpo-pref", 2)):
        result = run(["bash", f"exp/{recipe}_exp/train_exo.sh", "n", "init", "data", loss, str(k)], env=env)
        assert result.returncode == 0, result.stderr
    lines = (tmp_path / "argv").read_text().splitlines()
    eps = [float(line.split("--pref_epsilon ")[1].split()[0]) if "--pref_epsilon" in line else None for line in lines]
    assert eps[0] == pytest.approx(4.5397868702434395e-05, rel=1e-12)  # sigmoid(-10)
    assert eps[1] == pytest.approx(3 * 2.718281828459045 ** -10 / (1 + 3 * 2.718281828459045 ** -10), rel=1e-12)
    assert eps[2] is None  # DPO keeps its one-hot default


# -- end to end through the launchers --------------------------------------------------------
@pytest.mark.slow
def test_conversational_pipeline_end_to_end(chat_models, chat_pref, tmp_path):
    """SFT and RM (launchers, one CPU rank) on conversational pref parquet; sampling stops at
    <|im_end|> (not EOS) and writes assistant messages; calc_logprobs re-scores them as the
    sampler saw them; the RM labels them into conversational rw, which as parquet trains
    train_exo on 2 ranks with K = 4."""
    env = {"OUTPUT_ROOT": str(tmp_path / "models"), "TB_ROOT": str(tmp_path / "tb"), "DEVICE_IDS": "0"}
    data_flags = ["--data_split_names", "train_prefs", "test_prefs", "--columns", "prompt=question",
                  "--max_seq_len", "64", "--max_gen_len", "16", "--gradient_accumulation_steps", "1",
                  "--data_output_path", str(tmp_path / "cache"), "--no-gradient_checkpointing"]
    sft = run(["bash", "exp/custom_exp/train_sft.sh", "tiny", chat_models["chatml"], "base", "c/pref", chat_pref,
               *data_flags, "--num_train_epochs", "12", "--learning_rate", "1e-2", "--zero_stage", "0"], env=env)
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    sft_dir = tmp_path / "models" / "tiny_c" / "sft"
    # the SFT launcher's test on pref data (prompt + chosen): its model, training.log and TensorBoard run
    AutoModelForCausalLM.from_pretrained(sft_dir)
    assert (sft_dir / "training.log").exists() and os.listdir(tmp_path / "tb")
    rm = run(["bash", "exp/custom_exp/train_rm.sh", "tiny", str(sft_dir), "sft", "c/pref", chat_pref,
              *data_flags, "--max_iter_step", "2", "--zero_stage", "0"], env=env)
    assert rm.returncode == 0, rm.stdout[-3000:] + rm.stderr[-3000:]
    rm_dir = tmp_path / "models" / "tiny_c" / "rm"
    AutoModelForSequenceClassification.from_pretrained(rm_dir)

    gen = tmp_path / "gen_sft"
    sample = run(["bash", "exp/custom_exp/inference_sft.sh", "0", f"c/pref:{chat_pref}", "test", str(sft_dir),
                  "--data_split_names", "train_prefs", "test_prefs", "--columns", "prompt=question",
                  "--return_num", "4", "--temp", "0.5", "--max_new_tokens", "12", "--max_length", "64",
                  "--save_logps", "--output_path", str(gen)], env=env)
    assert sample.returncode == 0, sample.stdout[-3000:] + sample.stderr[-3000:]
    records = json.loads((gen / "test.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    completions = [c for r in records for c in r["completions"]]
    assert all(c["role"] == "assistant" and "<|im_end|>" not in c["content"] for c in completions)
    assert isinstance(records[0]["prompt"], list) and records[0]["prompt"][0] == SYSTEM
    # the model learned to answer and end its turn: completions stop well before max_new_tokens
    lengths = [len(tokenizer(c["content"], add_special_tokens=False)["input_ids"]) for c in completions]
    assert sum(n < 11 for n in lengths) >= len(lengths) // 2, completions

    logps = run(["python", "src/calc_logprobs.py", "--model_name_or_path", str(sft_dir), "--data_path", str(gen),
                 "--split", "test", "--temp", "0.5", "--max_seq_len", "64", "--max_gen_len", "16",
                 "--output_path", str(tmp_path / "logps.json")])
    assert logps.returncode == 0, logps.stderr[-3000:]
    scored = json.loads((tmp_path / "logps.json").read_text())
    for sampled, rescored in zip(records, scored):
        assert rescored["logps"] == pytest.approx(sampled["logps"], abs=1e-4)

    label = run(["python", "src/inference_rm.py", "--model_name_or_path", str(rm_dir), "--data_path", str(gen),
                 "--split", "test", "--max_seq_len", "64", "--max_gen_len", "16"])
    assert label.returncode == 0, label.stderr[-3000:]
    rw_records = json.loads((tmp_path / "gen_rw" / "test.json").read_text())
    assert rw_records[0]["prompt"] == records[0]["prompt"] and rw_records[0]["completions"] == records[0]["completions"]
    # the README's snippet scores a conversation with the exported RM as scoring did
    rm_model, rm_tok = AutoModelForSequenceClassification.from_pretrained(rm_dir), AutoTokenizer.from_pretrained(rm_dir)
    end = rm_tok.convert_tokens_to_ids("<|im_end|>")
    ids = rm_tok.apply_chat_template(rw_records[0]["prompt"] + [rw_records[0]["completions"][0]])["input_ids"]
    ids = ids[:len(ids) - ids[::-1].index(end)]
    with torch.no_grad():
        reward = rm_model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert reward == pytest.approx(rw_records[0]["rewards"][0], abs=1e-4)
    rw_dir = tmp_path / "rw"
    for split in ("train", "test"):
        write_parquet(rw_dir, split, [{k: r[k] for k in ("prompt", "completions", "rewards")} for r in rw_records])

    exo = run(["bash", "exp/custom_exp/train_exo.sh", "tiny", str(sft_dir), "sft", "c/rw", str(rw_dir), "exo-rw", "4",
               "--max_iter_step", "2", "--num_save_checkpoint", "1", "--per_device_train_batch_size", "2",
               "--per_device_eval_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_seq_len", "64",
               "--max_gen_len", "16", "--data_output_path", str(tmp_path / "cache"), "--zero_stage", "0",
               "--no-gradient_checkpointing"], env={**env, "DEVICE_IDS": "0,1"})
    assert exo.returncode == 0, exo.stdout[-3000:] + exo.stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "tiny_c" / "align_exo-rw_nc4" / "ckpt1")
