"""What the policy sampled is exactly what gets scored: the KL pipeline against an exact value.

A GPT-2 over a 6-token vocabulary (EOS and five words) samples at most 4 tokens, so every
completion of a prompt can be enumerated (the prefix tree has 1 + 5 + 25 + 125 inner nodes)
and KL(pi^temp || pi_sft^temp) computed exactly in float64. The pipeline inference_sft ->
calc_logprobs x2 -> eval_kl must agree with it within 3 standard errors, with about half of
the samples cut by --max_new_tokens; scoring the same samples from their text with EOS
appended (the path of data without completion_ids) must not. The stages run as real
processes forked from one that imported torch once (tests/forked_cli.py).
"""
import json
import math
import re

import pytest
import torch
from helpers import REPO_ROOT, read, run, write_split
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from utils.data.encoders import AlignmentEncoder
from utils.data.tokenisation import Tokenisation, tokenizer_fingerprint
from utils.inference import completion_batch
from utils.model_utils import load_tokenizer

WORDS = ["a", "b", "c", "d", "e"]
EOS = 0
TEMP, MAX_NEW = 0.8, 4
PROMPTS = ["a b", "c"]
RETURN_NUM = 1500


def tiny_vocab_model(path, seed, noise_from=None, padding=0, n_embd=16, n_head=2, scale=0.1):
    """A random GPT-2 over EOS + WORDS (word-level tokenizer) whose completions of PROMPTS are
    cut by MAX_NEW about half of the time; with `noise_from`, that model with noise on every
    weight (a policy about 1 nat away from it); `scale` is the std of both. `padding`: that many
    more embedding and head rows than the tokenizer has tokens (a padded vocabulary, as Pythia's
    and Qwen's). vLLM's CPU attention needs n_embd / n_head >= 32."""
    vocab = {"<eos>": EOS, **{w: i + 1 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", model_max_length=16)
    torch.manual_seed(seed)
    if noise_from is None:
        config = GPT2Config(vocab_size=len(vocab) + padding, n_embd=n_embd, n_layer=1, n_head=n_head,
                            n_positions=16, bos_token_id=EOS, eos_token_id=EOS, initializer_range=scale)
        model = GPT2LMHeadModel(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(noise_from)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * scale)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.no_grad()
def exact_kl(policy_path, ref_path, prompt, temp=TEMP, max_new=MAX_NEW):
    """(KL(pi^temp || ref^temp) over every completion of `prompt`, P(cut by max_new)), float64,
    by walking the prefix tree: a leaf is a completion that drew EOS or reached max_new tokens."""
    tokenizer = load_tokenizer(policy_path)
    policy, ref = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (policy_path, ref_path))
    prompt_ids = tokenizer(prompt)["input_ids"]
    frontier = [([], 0.0, 0.0)]  # (prefix, log pi, log ref)
    kl = p_cut = 0.0
    for step in range(max_new):
        inputs = torch.tensor([prompt_ids + prefix for prefix, _, _ in frontier])
        # the padded-vocabulary rule: ids past the tokenizer are no tokens, never drawn nor normalised over
        lp = torch.log_softmax(policy(inputs).logits[:, -1, :len(tokenizer)] / temp, -1).tolist()
        lq = torch.log_softmax(ref(inputs).logits[:, -1, :len(tokenizer)] / temp, -1).tolist()
        grown = []
        for (prefix, a, b), row_p, row_q in zip(frontier, lp, lq):
            for token, (tp, tq) in enumerate(zip(row_p, row_q)):
                a2, b2 = a + tp, b + tq
                if token == EOS or step == max_new - 1:
                    kl += math.exp(a2) * (a2 - b2)
                    p_cut += math.exp(a2) * (token != EOS)
                else:
                    grown.append((prefix + [token], a2, b2))
        frontier = grown
    return kl, p_cut


# Strips what makes a file token-exact the way data from another tokenizer or from before
# completion_ids would be scored: text re-tokenised, EOS appended to every completion.
AS_TEXT = """
import json, sys
src, dst = sys.argv[1:]
records = json.load(open(src))
for r in records:
    r["tokenizer_fingerprint"] = "another tokenizer"
    for key in ("logps", "temp", "scored_tokens"):
        r.pop(key)
json.dump(records, open(dst, "w"))
"""


def forked(cases, tmp_path):
    """Run argv lists as processes forked from one importing process: [(exit code, stdout, stderr)]."""
    (tmp_path / "cases.json").write_text(json.dumps([{"argv": argv} for argv in cases]))
    results = tmp_path / "results"
    results.mkdir()
    done = run(["python", str(REPO_ROOT / "tests" / "forked_cli.py"), str(tmp_path / "cases.json"), str(results)],
               timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads((results / "results.json").read_text())
    return [(code, (results / f"{i}.out").read_text(), (results / f"{i}.err").read_text()) for i, code in enumerate(codes)]


@pytest.fixture(scope="module", params=[0, 3], ids=["exact_vocab", "padded_vocab"])
def sft_model(request, tmp_path_factory):
    """The reference model; padded_vocab: 3 head rows past the tokenizer, whose logits the
    random head makes as large as any token's (so the sampler would draw them, unmasked)."""
    return tiny_vocab_model(tmp_path_factory.mktemp("tiny_vocab") / "sft", seed=0, padding=request.param)


def run_pipeline(root, sft, policy, backend="hf"):
    """Sample from pi with `backend` (a vLLM engine starts in a process of its own: its start-up
    outlasts a forked case's timeout), score with pi and pi_sft on the ids and (a copy) on the
    text + EOS, estimate both KLs. Returns {name: path} of every file, plus the stage outputs."""
    write_split(root / "prompts", "test", [{"prompt": p, "chosen": "a"} for p in PROMPTS])
    (root / "as_text.py").write_text(AS_TEXT)
    gen, text = root / "gen", root / "text"
    text.mkdir()
    paths = {"sft": sft, "policy": policy, "gen": gen / "test.json", "text": text / "test.json"}
    score = ["--split", "test", "--max_seq_len", "10", "--max_gen_len", str(MAX_NEW + 1), "--temp", str(TEMP),
             "--batch_size", "1"]
    sampling = ["src/inference_sft.py", "--model_name_or_path", policy, "--data_name_path", f"toy/sft:{root / 'prompts'}",
                "--output_path", str(gen), "--split", "test", "--return_num", str(RETURN_NUM), "--temp", str(TEMP),
                "--max_new_tokens", str(MAX_NEW), "--max_length", "8", "--batch_size", "2", "--seed", "3",
                "--save_logps", "--backend", backend]
    if backend != "hf":
        done = run(["python", *sampling], timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    cases = [sampling] if backend == "hf" else []
    cases.append([str(root / "as_text.py"), str(paths["gen"]), str(paths["text"])])
    for data, name in ((gen, "gen"), (text, "text")):
        for model in ("policy", "sft"):
            paths[f"{name}_{model}"] = root / f"{name}_{model}.json"
            if (name, model) == ("text", "policy"):
                warned = len(cases)  # the first scoring of text: its warning
            cases.append(["src/calc_logprobs.py", "--model_name_or_path", paths[model], "--data_path", str(data),
                          *score, "--output_path", str(paths[f"{name}_{model}"])])
    for name in ("gen", "text"):
        paths[f"{name}_kl"] = root / f"{name}_kl.json"
        cases.append(["src/eval_kl.py", str(paths[f"{name}_policy"]), str(paths[f"{name}_sft"]),
                      "--output_path", str(paths[f"{name}_kl"])])
    cases.append(["src/eval_kl.py", str(paths["gen_policy"]), str(paths["text_sft"])])  # other tokens: refused
    outputs = forked(cases, root)
    for argv, (code, out, err) in zip(cases[:-1], outputs):
        assert code == 0, f"{argv[0]}: {err[-3000:]}"
    paths["refused"] = outputs[-1]
    paths["text_warning"] = outputs[warned][2]
    return paths


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, sft_model):
    root = tmp_path_factory.mktemp("token_exact")
    return run_pipeline(root, sft_model, tiny_vocab_model(root / "policy", seed=1, noise_from=sft_model))


@pytest.fixture(scope="module")
def exact(pipeline):
    values = [exact_kl(pipeline["policy"], pipeline["sft"], p) for p in PROMPTS]
    return {"kl": sum(v[0] for v in values) / len(values), "p_cut": sum(v[1] for v in values) / len(values)}


@pytest.mark.slow
def test_pipeline_kl_estimate_agrees_with_the_enumerated_kl(pipeline, exact):
    records = read(pipeline["gen"])
    stops = [s for r in records for s in r["stop_token"]]
    assert len(stops) == len(PROMPTS) * RETURN_NUM
    assert max(i for r in records for ids in r["completion_ids"] for i in ids) <= len(WORDS)  # tokens only
    assert 0.25 < stops.count(None) / len(stops) < 0.75  # many samples cut by --max_new_tokens
    assert 0.25 < exact["p_cut"] < 0.75
    estimate = read(pipeline["gen_kl"])
    print(f"exact KL {exact['kl']:.4f}; token-exact estimate {estimate['kl']:.4f} +- {estimate['se']:.4f}")
    assert estimate["n"] == len(stops)
    assert abs(estimate["kl"] - exact["kl"]) < 3 * estimate["se"]
    assert estimate["se"] < 0.1 * exact["kl"]  # so that the check has teeth


@pytest.mark.slow
def test_text_and_eos_path_misses_the_enumerated_kl(pipeline, exact):
    """The same samples scored from their text, EOS appended to every completion (also to the
    ones --max_new_tokens cut), estimate the KL of events that were not sampled."""
    assert "scored from their text + EOS" in pipeline["text_warning"]
    estimate = read(pipeline["text_kl"])
    print(f"exact KL {exact['kl']:.4f}; text + EOS estimate {estimate['kl']:.4f} +- {estimate['se']:.4f}")
    assert abs(estimate["kl"] - exact["kl"]) > 6 * estimate["se"]


@pytest.mark.slow
def test_stored_ids_scored_again_give_the_samplers_logps(pipeline):
    sampled, scored = read(pipeline["gen"]), read(pipeline["gen_policy"])
    diffs = [a - b for r, s in zip(sampled, scored) for a, b in zip(r["logps"], s["logps"])]
    assert max(map(abs, diffs)) < 1e-4
    assert [r["scored_tokens"] for r in sampled] == [s["scored_tokens"] for s in scored]
    assert all(s["temp"] == TEMP for s in scored)


@pytest.mark.slow
def test_eval_kl_refuses_files_that_scored_other_tokens_or_temperatures(pipeline, tmp_path):
    code, _, err = pipeline["refused"]
    assert code == 2 and err.count("\n") == 1
    assert re.search(r'text_sft\.json record \d+ field "scored_tokens"\[\d+\]: scored other tokens', err), err
    from eval_kl import kl_estimate
    from utils.fileio import InputError

    hotter = read(pipeline["gen_sft"])
    for record in hotter:
        record["temp"] = 1.0
    (tmp_path / "hot.json").write_text(json.dumps(hotter))
    with pytest.raises(InputError, match=r'record 0 field "temp": scored at temperature 1\.0, but .* at 0\.8'):
        kl_estimate(str(pipeline["gen_policy"]), str(tmp_path / "hot.json"))
    assert kl_estimate(str(pipeline["gen"]), str(pipeline["gen_sft"]))["kl"] == \
        pytest.approx(read(pipeline["gen_kl"])["kl"], abs=1e-5)  # --save_logps output is a policy file too


def test_alignment_and_scoring_use_the_ids_and_append_no_eos(sft_model):
    """rw/gen records with ids: the training encoder and the scoring batch take them as they are
    (cut only by --max_gen_len); another tokenizer's ids fall back to the text + EOS."""
    tokenizer = load_tokenizer(sft_model)
    tokenisation = Tokenisation(tokenizer, 10, 3)
    # texts that are not the ids: which one is scored shows
    record = {"prompt": "a b", "completions": ["c", "d"], "rewards": [1.0, 0.0],
              "completion_ids": [[3, EOS], [4, 5, 1, 2]], "stop_token": [EOS, None],
              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source_model": "x"}
    encoded = AlignmentEncoder(tokenisation, "rw.json", "rw", 2, False)({k: [v] for k, v in record.items()}, [0])
    assert encoded["input_ids"] == [[[1, 2, 3, EOS], [1, 2, 4, 5, 1]]]  # the cut one cut at --max_gen_len 3
    batch = completion_batch(tokenisation, [record])
    assert batch["input_ids"][0, :4].tolist() == [1, 2, 3, EOS] and batch["attention_mask"][0].sum() == 4
    assert batch["loss_mask"][1].tolist() == [0, 0, 1, 1, 1]
    other = {**record, "tokenizer_fingerprint": "0" * 16}
    assert completion_batch(tokenisation, [other])["input_ids"][1].tolist() == [1, 2, 4, EOS]


def test_training_data_mixing_records_with_and_without_ids(sft_model, tmp_path):
    """Through the cached tokenisation: a record with ids (after one without: the columns come
    from all records, not the first) trains on its ids, the other on its text + EOS."""
    from utils.data.tokenised_datasets import tokenised_split
    from utils.data.raw_datasets import JsonDataset

    tokenizer = load_tokenizer(sft_model)
    tokenisation = Tokenisation(tokenizer, 10, 5)
    plain = {"prompt": "a", "completions": ["b", "c d"], "rewards": [1.0, 0.0]}
    exact = {"prompt": "a", "completions": ["", "e e e e"], "rewards": [0.0, 1.0], "completion_ids": [[EOS], [5] * 4],
             "stop_token": [EOS, None], "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "source_model": "x"}
    write_split(tmp_path / "rw", "train", [plain, exact])
    dataset, _ = tokenised_split(JsonDataset("mixed", str(tmp_path / "rw"), "rw"), "train", tokenisation,
                                 str(tmp_path / "cache"), {"stage": "test"},
                                 lambda t, s, k: AlignmentEncoder(t, s, k, 2, False))
    assert dataset["input_ids"] == [[[1, 2, EOS], [1, 3, 4, EOS]], [[1, EOS], [1, 5, 5, 5, 5]]]


@pytest.mark.slow
def test_ids_and_text_agree_or_the_record_is_refused(sft_model, pipeline):
    """A completion whose text was edited after sampling (the obvious way to trim a sample) is
    one error line naming the record and field, not silently scored from its old ids."""
    from utils.data.encoders import Encoder
    from utils.fileio import InputError

    tokenisation = Tokenisation(load_tokenizer(sft_model), 10, 5)
    records = read(pipeline["gen"])
    encoder = Encoder(tokenisation, "gen.json", "gen")
    for index, record in enumerate(records):  # every sampled record, cut or stopped, agrees
        encoder.check(record, index)
    edited = json.loads(json.dumps(records[1]))
    edited["completions"][2] = edited["completions"][2] + " a"
    with pytest.raises(InputError, match=r'^gen\.json record 1 field "completions\[2\]": the text is not what its '
                                         r'completion_ids decode to'):
        encoder.check(edited, 1)
