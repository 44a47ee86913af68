"""The catalogue of bad inputs, across every entry script: each case exits with code 2 and one
`error:` line on stderr that names the file, record and field (or the flag) and what to do,
with no traceback and nothing written.

The cases run as real processes forked from one process that imported torch, transformers
and DeepSpeed once (tests/forked_cli.py), so 35 cases cost seconds, not minutes.
"""
import json
import os
import re
import shutil

import pytest
from helpers import forked_runs, write_split

RW = [{"prompt": "the movie", "completions": ["good fun", "bad", "great", "dull"], "rewards": [2.0, -1.0, 1.0, -0.5]}
      for _ in range(4)]
PREF = [{"prompt": "the movie", "chosen": "good fun", "rejected": "dull"} for _ in range(4)]
GEN = [{"prompt": "the movie", "completions": ["good fun", "bad"]} for _ in range(3)]


def records(base, mutate=None):
    out = json.loads(json.dumps(base))
    if mutate:
        mutate(out)
    return out


def data_dir(case_dir, train, test=None, name="data"):
    """A data directory with train/test splits; `train` may be records or raw text for train.json(l)."""
    directory = case_dir / name
    for split, content in (("train", train), ("test", train if test is None else test)):
        if isinstance(content, tuple):  # (file name, raw bytes)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / content[0]).write_bytes(content[1])
        else:
            write_split(directory, split, content)
    return directory


def rw(case, mutate=None):
    return f"bad/rw:{data_dir(case, records(RW, mutate))}"


def pref(case, mutate=None, kind="pref"):
    return f"bad/{kind}:{data_dir(case, records(PREF, mutate))}"


def raw(case, kind, file_name, content):
    directory = data_dir(case, (file_name, content), (file_name.replace("train", "test"), content))
    return f"bad/{kind}:{directory}"


def no_eos_model(case, model):
    """A copy of the tiny model whose tokenizer has no pad, BOS or EOS token."""
    path = case / "no_eos_model"
    shutil.copytree(model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    config.pop("bos_token", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def no_tokenizer_model(case, model):
    """A copy of the tiny model without its tokenizer files."""
    path = case / "no_tokenizer_model"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(model, name), path / name)
    return str(path)


def logprobs_of_ids(mutate):
    """calc_logprobs on gen data whose records carry the tiny tokenizer's token-exact fields, mutated."""
    def make(case, tiny):
        from utils.data.tokenisation import tokenizer_fingerprint
        from utils.model_utils import load_tokenizer

        tokenizer = load_tokenizer(tiny)
        fingerprint = tokenizer_fingerprint(tokenizer)
        ids = [[5, 6], [7]]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        def exact(rs):
            for r in rs:  # texts the ids decode to, as a sampler writes them
                r.update(completions=list(texts), completion_ids=json.loads(json.dumps(ids)), stop_token=[None, None],
                         tokenizer_fingerprint=fingerprint)
            mutate(rs)
        return ["src/calc_logprobs.py", "--model_name_or_path", tiny, "--data_path", gen_dir(case, exact),
                "--split", "test", "--output_path", str(case / "out" / "o.json")]
    return make


def resume_state(case, layout):
    """A run_state.json a checkpoint written with `layout` would hold: its directory."""
    path = case / "ckpt"
    path.mkdir()
    (path / "run_state.json").write_text(json.dumps({"state": {"step": 1}, "layout": layout}))
    return str(path)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# a template that renders an answered turn under another header than its generation prompt
PREFIX_BREAKING = CHATML.replace("m['role'] + '\\n'", "(m['role'] if m['role'] != 'assistant' else 'bot') + '\\n'")
CHAT_PREF = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the movie?"}],
              "chosen": {"role": "assistant", "content": "good fun"}, "rejected": "dull"} for _ in range(4)]


def chat_pref(case, mutate=None, kind="pref"):
    return f"bad/{kind}:{data_dir(case, records(CHAT_PREF, mutate))}"


def parquet_bytes(rows):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def chat_model(case, model):
    """A copy of the tiny model whose tokenizer has a ChatML template."""
    path = case / "chat_model"
    shutil.copytree(model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


def train(script, data, *flags, model=None):
    """argv of a training stage writing into the case directory."""
    return lambda case, tiny: [f"src/{script}", "--model_name_or_path", model(case, tiny) if model else tiny,
                               "--data_name_path", data(case) if callable(data) else data,
                               "--output_dir", str(case / "out"), "--data_output_path", str(case / "cache"),
                               *[f(case) if callable(f) else f.format(case=case) for f in flags]]


def exo(data, *flags, **kwargs):
    return train("train_exo.py", data, "--loss_type", "exo-rw", "--num_contrastive", "2", *flags, **kwargs)


def gen_dir(case, mutate=None):
    directory = case / "gen_sft"
    write_split(directory, "test", records(GEN, mutate))
    return str(directory)


def tool(script, *args):
    return lambda case, tiny: [f"src/{script}", *[(a(case, tiny) if a is chat_model else a(case)) if callable(a)
                                                  else a.format(case=case, tiny=tiny) for a in args]]


def _file(path_in_case, text):
    def make(case):
        path = case / path_in_case
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    return make


# name -> (argv maker (case dir, tiny model) -> argv, regex the one stderr line must match)
CATALOGUE = {
    # -- files --------------------------------------------------------------------------------
    "missing data dir": (exo("x/rw:/nonexistent/dir"),
                         r"/nonexistent/dir: no train\.json, train\.jsonl, train\.parquet or save_to_disk folder .*"
                         r"check the path"),
    "not UTF-8": (exo(lambda c: raw(c, "rw", "train.json", b"[\xff\xfe]")), r"train\.json: not UTF-8 text"),
    "malformed JSON": (exo(lambda c: raw(c, "rw", "train.json", b'[{"prompt": "a",\n "completions": [}]')),
                       r"train\.json line 2: malformed JSON"),
    "malformed JSONL": (train("train_rm.py", lambda c: raw(c, "pref", "train.jsonl",
                                                           b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')),
                        r"train\.jsonl line 2: malformed JSON"),
    "JSON not a list": (exo(lambda c: raw(c, "rw", "train.json", b'{"prompt": "a"}')),
                        r"train\.json: expected a JSON list of records, got dict"),
    "record not an object": (exo(lambda c: rw(c, lambda r: r.__setitem__(1, ["a", "b"]))),
                             r"train\.json record 1: expected a JSON object, got list"),
    "no records": (exo(lambda c: f"bad/rw:{data_dir(c, [])}"), r"train\.json: no records"),
    # -- fields -------------------------------------------------------------------------------
    "missing field": (exo(lambda c: rw(c, lambda r: r[3].pop("rewards"))), r"record 3 field \"rewards\": missing field"),
    "mistyped field": (exo(lambda c: rw(c, lambda r: r[1].__setitem__("prompt", 5))),
                       r"record 1 field \"prompt\": expected str, got int"),
    "empty completions": (exo(lambda c: rw(c, lambda r: r[2].update(completions=[], rewards=[]))),
                          r"record 2 field \"completions\": empty list"),
    "empty completion": (exo(lambda c: rw(c, lambda r: r[0]["completions"].__setitem__(2, ""))),
                         r"record 0 field \"completions\"\[2\]: empty completion"),
    "ragged rewards": (exo(lambda c: rw(c, lambda r: r[1]["rewards"].pop())),
                       r"record 1 field \"rewards\": 3 rewards for 4 completions"),
    "non-finite reward": (exo(lambda c: rw(c, lambda r: r[2]["rewards"].__setitem__(1, float("nan")))),
                          r"record 2 field \"rewards\"\[1\]: non-finite reward"),
    "reward not a number": (exo(lambda c: rw(c, lambda r: r[0]["rewards"].__setitem__(0, "2"))),
                            r"record 0 field \"rewards\"\[0\]: expected a number, got str"),
    "tie in pref mode": (exo(lambda c: rw(c, lambda r: r[0]["rewards"].__setitem__(1, 2.0)), "--loss_type", "dpo-pref"),
                         r"record 0 field \"rewards\": candidates 0\.\.1 tie for the best reward"),
    "C not a multiple of K": (exo(lambda c: rw(c), "--num_contrastive", "3"),
                              r"record 0 field \"completions\": 4 candidates is not a multiple of --num_contrastive 3"),
    "K above C": (exo(lambda c: rw(c), "--num_contrastive", "8"), r"fewer than --num_contrastive 8"),
    "sft empty chosen": (train("train_sft.py", lambda c: pref(c, lambda r: r[1].update(chosen=""), "sft")),
                         r"train\.json record 1 field \"chosen\": empty text"),
    "rm missing rejected": (train("train_rm.py", lambda c: pref(c, lambda r: r[2].pop("rejected"))),
                            r"train\.json record 2 field \"rejected\": missing field"),
    "sft on rw data": (train("train_sft.py", "x/rw:/nonexistent"), r"SFT trains on sft data .* got kind 'rw'"),
    "both train.json and train.jsonl": (exo(lambda c: raw(c, "rw", "train.jsonl", json.dumps(RW[0]).encode())
                                            and rw(c)), r"holds train\.json and train\.jsonl; keep one file per split"),
    "columns naming a missing column": (train("train_rm.py", lambda c: raw(c, "pref", "train.parquet",
                                                                           parquet_bytes(PREF)),
                                              "--columns", "prompt=question"),
                                        r"train\.parquet: no column 'question' \(--columns prompt=question\); "
                                        r"its columns are prompt, chosen, rejected"),
    # -- conversations --------------------------------------------------------------------------
    "conversation without a chat template": (train("train_sft.py", lambda c: chat_pref(c)),
                                             r"train\.json record 0 field \"prompt\": a conversation .*has no chat "
                                             r"template; pass --chat_template PATH"),
    "prompt not ending with a user turn": (train("train_sft.py", lambda c: chat_pref(c, lambda r: r[2]["prompt"].append(
                                               {"role": "assistant", "content": "hm"})), model=chat_model),
                                           r"record 2 field \"prompt\": the prompt must end with a user turn, its last "
                                           r"is 'assistant'"),
    "completion not from the assistant": (train("train_rm.py", lambda c: chat_pref(
                                              c, lambda r: r[1]["chosen"].update(role="user")), model=chat_model),
                                          r"record 1 field \"chosen\": a completion's role must be 'assistant', got 'user'"),
    "template breaking the prefix rule": (exo(lambda c: chat_pref(c), "--loss_type", "exo-pref", "--chat_template",
                                              _file("prefix_breaking.jinja", PREFIX_BREAKING)),
                                          r"record 0 field \"chosen\": the chat template renders the conversation "
                                          r"with this answer so that it does not start with the prompt"),
    "sampling a conversation with --chat_template none": (tool("inference_sft.py", "--model_name_or_path", chat_model,
                                                               "--data_name_path", lambda c: chat_pref(c),
                                                               "--output_path", "{case}/out", "--chat_template", "none"),
                                                          r"record 0 field \"prompt\": a conversation .*--chat_template "
                                                          r"none; pass --chat_template auto"),
    # -- models -------------------------------------------------------------------------------
    "model path not a model": (exo(lambda c: rw(c), model=lambda c, t: str(c)), r"cannot load .*pass a Hugging Face model"),
    "tokenizer without pad or EOS": (train("train_sft.py", lambda c: pref(c), model=lambda c, t: no_eos_model(c, t)),
                                     r"no_eos_model: the tokenizer has neither a pad nor an EOS token"),
    "model without tokenizer files": (train("train_sft.py", lambda c: pref(c, kind="sft"),
                                            model=lambda c, t: no_tokenizer_model(c, t)),
                                      r"no_tokenizer_model: the tokenizer encodes text to no tokens"),
    "sampling without tokenizer files": (lambda c, t: ["src/inference_sft.py", "--model_name_or_path",
                                                       no_tokenizer_model(c, t), "--data_name_path", pref(c, kind="sft"),
                                                       "--output_path", str(c / "out")],
                                         r"no_tokenizer_model: the tokenizer encodes text to no tokens"),
    "max_seq_len beyond the model's positions": (exo(lambda c: rw(c), "--max_seq_len", "512"),
                                                 r"--max_seq_len 512 is more than the 256 positions the model .*; "
                                                 r"use --max_seq_len 256 or less"),
    "scoring max_seq_len beyond the positions": (tool("calc_logprobs.py", "--model_name_or_path", "{tiny}",
                                                      "--data_path", gen_dir, "--split", "test", "--max_seq_len", "300",
                                                      "--output_path", "{case}/out/o.json"),
                                                 r"--max_seq_len 300 is more than the 256 positions"),
    "sampling max_length beyond the positions": (tool("inference_sft.py", "--model_name_or_path", "{tiny}",
                                                      "--data_name_path", lambda c: pref(c, kind="sft"),
                                                      "--output_path", "{case}/out", "--max_length", "512"),
                                                 r"--max_length 512 is more than the 256 positions"),
    # -- flags --------------------------------------------------------------------------------
    "dataset spec without colon": (exo("x/rw"), r"--data_name_path 'x/rw': expected NAME/KIND:PATH"),
    "unknown dataset": (exo(lambda c: f"imdb:{c}"), r"unknown dataset 'imdb' \(registered: "),
    "missing dataset module": (exo(lambda c: rw(c), "--dataset_module", "{case}/nowhere.py"),
                               r"--dataset_module .*nowhere\.py: no such file"),
    "max_gen_len not below max_seq_len": (train("train_sft.py", lambda c: pref(c, kind="sft"), "--max_seq_len", "16",
                                                "--max_gen_len", "16"), r"--max_gen_len 16 must be smaller than --max_seq_len"),
    "offload without ZeRO": (exo(lambda c: rw(c), "--offload", "--zero_stage", "0"), r"--offload needs --zero_stage"),
    "exo-pref with eps 0": (exo(lambda c: rw(c), "--loss_type", "exo-pref", "--pref_epsilon", "0"),
                            r"KL\(q \|\| p\) is infinite"),
    "keep_last_n 0": (exo(lambda c: rw(c), "--keep_last_n", "0"), r"--keep_last_n must be at least 1, got 0"),
    "max_nonfinite_steps 0": (exo(lambda c: rw(c), "--max_nonfinite_steps", "0"), r"--max_nonfinite_steps must be at least 1"),
    "resume from a non-checkpoint": (exo(lambda c: rw(c), "--resume", "{case}"), r"--resume .*: not a resumable checkpoint"),
    "resume with another learning rate": (exo(lambda c: rw(c), "--resume", lambda c: resume_state(
                                              c, {"learning_rate": 1e-3, "lr_scheduler_type": "cosine"}),
                                              "--learning_rate", "2e-3"),
                                          r"--resume .*ckpt: written with --learning_rate 0\.001, this run has "
                                          r"--learning_rate 0\.002; .*resume with --learning_rate 0\.001"),
    "bad tensorboard name": (train("train_rm.py", lambda c: pref(c), "--tensorboard_name_path", "run"),
                             r"--tensorboard_name_path 'run': expected RUN_NAME:LOG_DIR"),
    "output dir is a file": (exo(lambda c: rw(c), "--output_dir", "{case}/data/train.json"),
                             r"--output_dir .*train\.json: exists and is not a directory"),
    # -- the other entry scripts ----------------------------------------------------------------
    "sampling greedy with 2 returns": (tool("inference_sft.py", "--model_name_or_path", "{tiny}", "--data_name_path",
                                            lambda c: pref(c, kind="sft"), "--output_path", "{case}/out",
                                            "--temp", "0", "--return_num", "2"), r"--temp 0 is greedy decoding"),
    "scoring completions not a list": (tool("inference_rm.py", "--model_name_or_path", "{tiny}", "--data_path",
                                            lambda c: gen_dir(c, lambda r: r[1].__setitem__("completions", "x")),
                                            "--split", "test", "--output_path", "{case}/out"),
                                       r"gen_sft/test\.json record 1 field \"completions\": expected list, got str"),
    "log-probs completion not a string": (tool("calc_logprobs.py", "--model_name_or_path", "{tiny}", "--data_path",
                                               lambda c: gen_dir(c, lambda r: r[2]["completions"].append(3)),
                                               "--split", "test", "--output_path", "{case}/out/o.json"),
                                          r"record 2 field \"completions\"\[2\]: expected str, got int"),
    "completion_ids not one per completion": (logprobs_of_ids(lambda r: r[1]["completion_ids"].pop()),
                                              r"record 1 field \"completion_ids\": expected a list of one entry per "
                                              r"completion \(2\), got 1 entries"),
    "completion id outside the vocabulary": (logprobs_of_ids(lambda r: r[2]["completion_ids"][1].append(10 ** 6)),
                                             r"record 2 field \"completion_ids\"\[1\]: token id 1000000 is outside "
                                             r"the tokenizer's vocabulary"),
    "completion id not an integer": (logprobs_of_ids(lambda r: r[0]["completion_ids"][0].__setitem__(0, 1.5)),
                                     r"record 0 field \"completion_ids\"\[0\]: expected non-negative integer token ids"),
    "stop token not the last id": (logprobs_of_ids(lambda r: r[1]["stop_token"].__setitem__(0, 9)),
                                   r"record 1 field \"stop_token\"\[0\]: 9 is not the last of completion_ids\[0\]"),
    "completion_ids without a fingerprint": (logprobs_of_ids(lambda r: r[0].pop("tokenizer_fingerprint")),
                                             r"record 0 field \"tokenizer_fingerprint\": missing field"),
    "classifier label not 0 or 1": (train("train_class.py", lambda c: "bad/class:" + str(data_dir(
                                        c, [{"text": "good fun", "label": 1}, {"text": "dull", "label": 2}]))),
                                    r"train\.json record 1 field \"label\": expected 0 or 1, got 2"),
    "oracle pairs from one completion": (tool("inference_class.py", "--model_name_or_path", "{tiny}", "--data_path",
                                              lambda c: gen_dir(c, lambda r: r[1].__setitem__("completions", ["x"])),
                                              "--split", "test", "--output_path", "{case}/out"),
                                         r"record 1 field \"completions\": 1 completion; label_pref needs at least 2"),
    "kl of a missing file": (tool("eval_kl.py", "{case}/policy.json", "{case}/sft.json"),
                             r"policy\.json: cannot read \(No such file or directory\)"),
    "kl logps not finite": (tool("eval_kl.py", _file("policy.json", '[{"prompt": "p", "completions": ["a"], '
                                                                    '"logps": [NaN]}]'),
                                 _file("sft.json", '[{"prompt": "p", "completions": ["a"], "logps": [-1.0]}]')),
                            r"policy\.json record 0 field \"logps\"\[0\]: expected a finite number"),
    "pref_to_rw malformed JSONL": (tool("utils/data/pref_to_rw.py", lambda c: raw(c, "pref", "train.jsonl",
                                                                                  b'{"prompt": "a"\n').split(":", 1)[1]),
                                   r"train\.jsonl line 1: malformed JSON"),
    "tiny model from unreadable text": (tool("make_tiny_model.py", "--out", "{case}/out", "--text_file",
                                             lambda c: str(data_dir(c, ("corpus.txt", b"\xff\xfe")) / "corpus.txt")),
                                        r"corpus\.txt: cannot read as UTF-8 text"),
}


SCORING_LENGTHS = ["--max_seq_len", "64", "--max_gen_len", "16"]
LENGTHS = {**dict.fromkeys(["train_sft.py", "train_rm.py", "train_exo.py", "train_class.py", "inference_rm.py",
                            "calc_logprobs.py", "inference_class.py"], SCORING_LENGTHS),
           "inference_sft.py": ["--max_length", "64", "--max_new_tokens", "16"]}


def snapshot(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture(scope="module")
def catalogue_results(tiny_model, tmp_path_factory):
    """Build every case's inputs in its own directory and run them all:
    {name: (script, exit code, stdout, stderr, files before, files after)}."""
    root = tmp_path_factory.mktemp("catalogue")
    argvs, before = [], {}
    for index, (name, (make_argv, _)) in enumerate(CATALOGUE.items()):
        case = root / f"case{index}"
        case.mkdir()
        argv = make_argv(case, tiny_model)
        # lengths within the tiny model's 256 positions (the defaults' 512 are refused); a case's own come later and win
        argvs.append(argv[:1] + LENGTHS.get(os.path.basename(argv[0]), []) + argv[1:])
        before[name] = snapshot(case)
    results = forked_runs(root, argvs)
    return {name: (argvs[i][0], results[i].returncode, results[i].stdout, results[i].stderr,
                   before[name], snapshot(root / f"case{i}"))
            for i, name in enumerate(CATALOGUE)}


@pytest.mark.slow
def test_the_catalogue_covers_every_entry_script_with_at_least_25_cases(catalogue_results):
    assert len(CATALOGUE) >= 25
    scripts = {result[0] for result in catalogue_results.values()}
    assert scripts >= {"src/train_sft.py", "src/train_rm.py", "src/train_exo.py", "src/inference_sft.py",
                       "src/inference_rm.py", "src/calc_logprobs.py", "src/eval_kl.py", "src/utils/data/pref_to_rw.py",
                       "src/make_tiny_model.py", "src/train_class.py", "src/inference_class.py"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(catalogue_results, name):
    _, code, stdout, stderr, before, after = catalogue_results[name]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert code == 2, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert re.search(CATALOGUE[name][1], lines[0]), lines[0]
    assert after == before, f"wrote {sorted(set(after) - set(before))}"
    assert not any(os.path.basename(p).startswith(".") for p in after)  # no temporary leftovers either
