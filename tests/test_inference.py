"""Sampling, reward scoring, log-probs and the KL estimate end to end: one process and 2 CPU
ranks, crash and resume, the launchers, the sharding machinery in-process, and one-line
errors for bad input."""
import glob
import json
import os
import re
import shutil

import pytest
import torch
from helpers import NEGATIVE, POSITIVE, WORDS, forked_runs, launcher, ok, read, run, write_split
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from utils.data.collators import pad_sequences
from utils.data.tokenisation import Tokenisation
from utils.sharding import read_shard, shard_path, shard_range, sharded_map
from utils.logprobs import model_sequence_logprobs
from utils.model_utils import load_causal_lm, load_tokenizer

SAMPLE_FLAGS = ["--split", "test", "--return_num", "3", "--temp", "1.0", "--max_new_tokens", "8",
                "--max_length", "24", "--batch_size", "2", "--seed", "11"]
NUM_PROMPTS = 11  # odd, so the two ranks' slices differ in size


@pytest.fixture(scope="module")
def prompts_dir(tmp_path_factory):
    """sft data whose test split has NUM_PROMPTS prompts, two of them longer than the 16 tokens
    that --max_length 24 - --max_new_tokens 8 leave (so they are cut on the left)."""
    directory = tmp_path_factory.mktemp("prompts") / "toy"
    vocab = WORDS + POSITIVE + NEGATIVE
    records = [{"prompt": " ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(2 + i % 5)), "chosen": "good"}
               for i in range(NUM_PROMPTS - 2)]
    records += [{"prompt": " ".join(vocab * 2), "chosen": "fun"}, {"prompt": "the " * 40 + "end", "chosen": "bad"}]
    write_split(directory, "test", records)
    write_split(directory, "train", records[:3])
    return str(directory)


def sample_cli(model, data_dir, out, *flags, ranks=1, script="src/inference_sft.py"):
    return run([*launcher(ranks), script, "--model_name_or_path", model, "--data_name_path", f"toy/sft:{data_dir}",
                "--output_path", str(out), *SAMPLE_FLAGS, *flags], timeout=600)


@pytest.fixture(scope="module")
def sampled(tiny_model, prompts_dir, tmp_path_factory):
    """One single-process sampling run with --save_logps: its output directory."""
    out = tmp_path_factory.mktemp("sampled") / "toy_sft"
    ok(sample_cli(tiny_model, prompts_dir, out, "--save_logps"))
    return out


@pytest.fixture(scope="module")
def other_model(tiny_model, tmp_path_factory):
    """The tiny model with noise on every weight: a different policy, same tokenizer."""
    path = str(tmp_path_factory.mktemp("other") / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(path)
    load_tokenizer(tiny_model).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    """An untrained one-label reward model on the tiny backbone, saved as a HF directory."""
    from utils.model_utils import load_reward_model

    path = str(tmp_path_factory.mktemp("rm") / "rm")
    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    load_reward_model(tiny_model, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- sampling -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sampling_schema_order_and_seed(tiny_model, prompts_dir, sampled, tmp_path):
    """return_num completions with their exact ids for every prompt, in input order; the same
    command gives the same file; a batch draws the same whichever prompts follow it (--prompt_num)."""
    prompts = [r["prompt"] for r in read(os.path.join(prompts_dir, "test.json"))]
    records = read(sampled / "test.json")
    assert [r["prompt"] for r in records] == prompts
    eos = load_tokenizer(tiny_model).eos_token_id
    for record in records:
        assert set(record) == {"prompt", "completions", "completion_ids", "stop_token", "tokenizer_fingerprint",
                               "source_model", "logps", "temp", "scored_tokens"}
        assert len(record["completions"]) == 3 and all(isinstance(c, str) for c in record["completions"])
        assert len(record["logps"]) == 3 and all(isinstance(v, float) and v < 0 for v in record["logps"])
        assert record["source_model"] == tiny_model and record["temp"] == 1.0
        for ids, stop in zip(record["completion_ids"], record["stop_token"]):
            assert (stop == eos and ids[-1] == eos) or (stop is None and len(ids) == 8 and eos not in ids)
    assert not (sampled / ".shards").exists()

    ok(sample_cli(tiny_model, prompts_dir, tmp_path / "again", "--save_logps"))
    assert read(tmp_path / "again" / "test.json") == records
    ok(sample_cli(tiny_model, prompts_dir, tmp_path / "first4", "--prompt_num", "4"))
    dropped = ("logps", "temp", "scored_tokens")
    assert read(tmp_path / "first4" / "test.json") == [
        {k: v for k, v in r.items() if k not in dropped} for r in records[:4]]


CRASH_RANK1 = """
import glob, json, os, sys, time
import inference_sft

real_sample, calls = inference_sft.sample, []
shards = os.path.join(sys.argv[sys.argv.index("--output_path") + 1], ".shards", "test.rank0of2.*.json")


def rank0_done():
    return any(json.load(open(path))["complete"] for path in glob.glob(shards))


def crashing_sample(*args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        deadline = time.time() + 120
        while not rank0_done() and time.time() < deadline:  # let rank 0 finish its slice first
            time.sleep(0.1)
        raise RuntimeError("simulated crash of rank 1 in its third batch")
    return real_sample(*args, **kwargs)


inference_sft.sample = crashing_sample
inference_sft.main()
"""


@pytest.mark.slow
def test_two_ranks_keep_order_and_a_crashed_run_resumes_to_the_same_file(tiny_model, prompts_dir, tmp_path):
    """2 CPU ranks: input order kept. A run whose rank 1 dies in its third batch leaves rank 0's
    complete shard and rank 1's first two batches; the rerun reuses both and writes the file an
    uninterrupted run writes."""
    prompts = [r["prompt"] for r in read(os.path.join(prompts_dir, "test.json"))]
    ok(sample_cli(tiny_model, prompts_dir, tmp_path / "whole", ranks=2))
    whole = read(tmp_path / "whole" / "test.json")
    assert [r["prompt"] for r in whole] == prompts
    assert all(len(r["completions"]) == 3 for r in whole)

    wrapper = tmp_path / "crash_rank1.py"
    wrapper.write_text(CRASH_RANK1)
    out = tmp_path / "crashed"
    crashed = sample_cli(tiny_model, prompts_dir, out, "--save_interval", "0", ranks=2, script=str(wrapper))
    assert crashed.returncode != 0
    assert not (out / "test.json").exists()
    shards = {re.search(r"rank(\d)of2", p).group(1): p
              for p in glob.glob(str(out / ".shards" / "test.rank*of2.*.json"))}
    assert read_shard(shards["0"], shards["0"].split(".")[-2]) == (whole[:6], True)
    assert len(read(shards["1"])["outputs"]) == 4 and not read(shards["1"])["complete"]

    rerun = ok(sample_cli(tiny_model, prompts_dir, out, ranks=2))
    assert "rank 0: reusing its complete shard (6 outputs)" in rerun.stdout
    assert "rank 1: resuming its shard at 4 of 5" in rerun.stdout
    assert read(out / "test.json") == whole
    assert not (out / ".shards").exists()


def test_save_logps_equal_model_logprobs_of_the_drawn_tokens(tiny_model):
    """--save_logps values are log pi^temp(ids | prompt) of exactly the drawn ids (the EOS
    included where one was drawn, nothing appended where --max_new_tokens cut), as training
    computes them; the ids decode to the stored text."""
    from utils.sampling import fit_prompt, sample, sampling_config

    tokenizer = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, tokenizer, disable_dropout=True).eval()
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 3.5  # p(EOS) ~ 0.2 a step at temp 0.7: completions both end and get cut
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)

    class Args:
        temp, top_k, top_p, max_new_tokens, return_num, max_length = 0.7, 0, 1.0, 5, 4, 16

    config = sampling_config(Args, tokenizer)
    model.generation_config = config
    tokenisation = Tokenisation(tokenizer, Args.max_length, Args.max_new_tokens)
    texts = ["the movie", "a", "good plot and bad acting", " ".join(WORDS * 3)]
    prompt_ids = [fit_prompt(tokenisation, ids) for ids in tokenisation.prompts(texts)]
    assert len(prompt_ids[-1]) == Args.max_length - Args.max_new_tokens  # cut on the left
    assert prompt_ids[-1] == tokenisation.prompts(texts[-1:])[0][-len(prompt_ids[-1]):]
    ids, stops, completions, logps = sample(model, tokenizer, prompt_ids, config, seed=5, save_logps=True)

    exact, prompt_lens, stored = [], [], []
    for prompt, rows, row_stops, row_texts, row_logps in zip(prompt_ids, ids, stops, completions, logps):
        for drawn, stop, completion, value in zip(rows, row_stops, row_texts, row_logps):
            assert drawn and eos not in drawn[:-1] and (drawn[-1] == eos) == (stop == eos)
            assert completion == tokenizer.decode(drawn[:-1] if stop is not None else drawn)
            exact.append(prompt + drawn)
            prompt_lens.append(len(prompt))
            stored.append(value)
    assert None in sum(stops, []) and eos in sum(stops, [])  # both kinds occur
    with torch.no_grad():
        direct = model_sequence_logprobs(model, pad_sequences(exact, prompt_lens, tokenizer.pad_token_id), Args.temp)
    torch.testing.assert_close(torch.tensor(stored), direct, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_prompt_prefilled_once_samples_what_generate_samples(arch, tmp_path):
    """generate_once_per_prompt (each prompt's cache computed once, repeated K times) draws, for
    the same seed, the ids plain generate(num_return_sequences=K) draws, from the same
    distributions: left-padded prompts of several lengths, a 1-token one among them (its
    shared prefix is all padding)."""
    from helpers import plain_and_once_draws
    from utils.sampling import sampling_config
    from utils.tiny_model import builtin_corpus, make_tiny_model

    path = make_tiny_model(str(tmp_path / arch), builtin_corpus(), arch=arch)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer, disable_dropout=True).eval()

    class Args:
        temp, top_k, top_p, max_new_tokens, return_num = 0.9, 0, 1.0, 6, 3

    config = sampling_config(Args, tokenizer)
    model.generation_config = config
    prompts = [tokenizer(t)["input_ids"] for t in ("the movie was good and the plot", "a", "dull acting")]
    prompts[1] = prompts[1][:1]
    batch = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    fed = []  # (rows, tokens) of every forward
    model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
    prefills = {}

    def first_forward(mode):
        prefills[mode], fed[:] = fed[0], []
    drawn = plain_and_once_draws(model, batch, config, Args.temp, after_each=first_forward)
    width = batch["input_ids"].shape[1]
    assert prefills == {"plain": (len(prompts) * Args.return_num, width), "once": (len(prompts), width - 1)}
    assert drawn["once"][0].shape == (len(prompts) * Args.return_num, batch["input_ids"].shape[1] + Args.max_new_tokens)
    assert torch.equal(drawn["once"][0], drawn["plain"][0])
    torch.testing.assert_close(drawn["once"][1], drawn["plain"][1], atol=1e-5, rtol=0)


# -- scoring ------------------------------------------------------------------------------
GEN_RECORDS = [{"prompt": "the movie was", "completions": ["good fun", "bad", "a great film"]},
               {"prompt": "acting and music", "completions": ["awful and dull", "very good", "the plot"]},
               {"prompt": "a story", "completions": ["fun", "great acting", "dull scene"]}]


@pytest.mark.slow
def test_reward_labels_and_eval(reward_model, tmp_path):
    """label writes rw data beside the gen data (_sft -> _rw), one reward per completion, equal to
    the reward model read directly; eval writes their mean and std."""
    gen_dir = tmp_path / "toy_sft"
    write_split(gen_dir, "test", GEN_RECORDS)
    common = ["--model_name_or_path", reward_model, "--data_path", str(gen_dir), "--split", "test",
              "--batch_size", "2", "--max_seq_len", "32", "--max_gen_len", "16"]
    ok(run(["python", "src/inference_rm.py", *common, "--mode", "label"], timeout=300))
    labelled = read(tmp_path / "toy_rw" / "test.json")
    assert [{k: r[k] for k in ("prompt", "completions")} for r in labelled] == GEN_RECORDS
    rewards = [r for record in labelled for r in record["rewards"]]
    assert [len(r["rewards"]) for r in labelled] == [3, 3, 3]

    tokenizer = load_tokenizer(reward_model)
    tokenisation = Tokenisation(tokenizer, 32, 16)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    with torch.no_grad():
        for record, values in zip(GEN_RECORDS, (r["rewards"] for r in labelled)):
            joined = tokenisation.join_group(tokenisation.prompts([record["prompt"]])[0],
                                             tokenisation.completions(record["completions"]))
            for (ids, _), value in zip(joined, values):
                assert model(input_ids=torch.tensor([ids])).logits.item() == pytest.approx(value, abs=1e-5)

    ok(run(["python", "src/inference_rm.py", *common, "--mode", "eval"], timeout=300))
    summary = read(gen_dir / "test_reward_eval.json")
    assert summary["n"] == 9 and summary["num_prompts"] == 3
    assert summary["mean"] == pytest.approx(float(torch.tensor(rewards).mean()), abs=1e-6)
    assert summary["std"] == pytest.approx(float(torch.tensor(rewards).std(correction=0)), abs=1e-6)
    assert not glob.glob(str(tmp_path / "**" / ".shards"), recursive=True)


def direct_logps(model_path, records, max_seq_len, max_gen_len):
    tokenizer = load_tokenizer(model_path)
    tokenisation = Tokenisation(tokenizer, max_seq_len, max_gen_len)
    model = load_causal_lm(model_path, tokenizer).eval()
    out = []
    with torch.no_grad():
        for record in records:
            prompt = tokenisation.prompts([record["prompt"]])[0]
            joined = tokenisation.join_group(prompt, tokenisation.record_completions(record))
            batch = pad_sequences([s for s, _ in joined], [n for _, n in joined], tokenizer.pad_token_id)
            out.append(model_sequence_logprobs(model, batch).tolist())
    return out


@pytest.mark.slow
def test_calc_logprobs_and_eval_kl(tiny_model, other_model, sampled, tmp_path):
    """A model against itself (scored on 1 and on 2 ranks) gives KL 0; against another model a
    positive KL equal to the mean log-prob difference computed here directly."""
    flags = ["--data_path", str(sampled), "--split", "test", "--max_seq_len", "48", "--max_gen_len", "32",
             "--batch_size", "3"]
    files = {name: str(tmp_path / f"{name}.json") for name in ("policy", "policy_2ranks", "other")}
    ok(run(["python", "src/calc_logprobs.py", "--model_name_or_path", tiny_model, *flags,
            "--output_path", files["policy"]], timeout=300))
    ok(run([*launcher(2), "src/calc_logprobs.py", "--model_name_or_path", tiny_model, *flags,
            "--output_path", files["policy_2ranks"]], timeout=300))
    ok(run(["python", "src/calc_logprobs.py", "--model_name_or_path", other_model, *flags,
            "--output_path", files["other"]], timeout=300))

    samples = read(sampled / "test.json")
    policy = read(files["policy"])
    kept = ("prompt", "completions", "completion_ids", "stop_token", "tokenizer_fingerprint", "source_model")
    assert [{k: r[k] for k in kept} for r in policy] == [{k: r[k] for k in kept} for r in samples]
    direct_policy = direct_logps(tiny_model, samples, 48, 32)
    direct_other = direct_logps(other_model, samples, 48, 32)
    for record, expected in zip(policy, direct_policy):
        assert record["logps"] == pytest.approx(expected, abs=1e-4)

    ok(run(["python", "src/eval_kl.py", files["policy"], files["policy_2ranks"], "--output_path",
            str(tmp_path / "self.json")]))
    assert abs(read(tmp_path / "self.json")["kl"]) < 1e-6

    result = ok(run(["python", "src/eval_kl.py", files["policy"], files["other"], "--output_path",
                     str(tmp_path / "kl.json")]))
    kl = read(tmp_path / "kl.json")
    diffs = [a - b for pa, po in zip(direct_policy, direct_other) for a, b in zip(pa, po)]
    assert kl["n"] == len(diffs) == NUM_PROMPTS * 3
    assert kl["kl"] > 0
    assert kl["kl"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    assert "KL(pi || pi_sft) =" in result.stdout


# -- launchers ----------------------------------------------------------------------------
@pytest.mark.slow
def test_launchers_sample_and_label(tiny_model, reward_model, prompts_dir, tmp_path):
    """inference_sft.sh writes PATH_sft/SPLIT.json; inference_rm.sh (label by default) writes
    the rw data beside it."""
    data = tmp_path / "toy"
    shutil.copytree(prompts_dir, data)
    tiny = ["--max_new_tokens", "6", "--max_length", "24", "--return_num", "2", "--batch_size", "4"]
    ok(run(["bash", "exp/custom_exp/inference_sft.sh", "0", f"toy/sft:{data}", "test", tiny_model, *tiny], timeout=300))
    gen = read(tmp_path / "toy_sft" / "test.json")
    assert len(gen) == NUM_PROMPTS and all(len(r["completions"]) == 2 for r in gen)
    assert (tmp_path / "toy_sft" / "inference_sft_test.log").exists()

    ok(run(["bash", "exp/custom_exp/inference_rm.sh", "0", str(tmp_path / "toy_sft"), "test", reward_model,
            "--max_seq_len", "48", "--max_gen_len", "24"], timeout=300))
    rw = read(tmp_path / "toy_rw" / "test.json")
    assert [r["completions"] for r in rw] == [r["completions"] for r in gen]
    assert all(len(r["rewards"]) == 2 for r in rw)


# -- the sharding machinery, in-process ---------------------------------------------------
def test_shard_ranges_cover_the_inputs_in_order():
    for n in (0, 1, 5, 11, 12):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_sharded_map_merges_in_order_resumes_and_cleans_up(tmp_path):
    """Three 'ranks' run one after another in this process (rank 0 last: it merges). A rank that
    dies mid-slice keeps its finished batches; the rerun does only the rest, reuses complete
    shards, and the merge deletes every shard of the output, stale ones too."""
    inputs = [f"x{i}" for i in range(10)]
    output = tmp_path / "out" / "test.json"
    stale = shard_path(output, "0123456789abcdef", 1, 3)
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").write("{}")
    seen = []

    def process(items, first_index, fail_at=None):
        if first_index == fail_at:
            raise RuntimeError("crash")
        seen.extend(items)
        return [{"item": item, "index": first_index + i} for i, item in enumerate(items)]

    common = dict(output_file=output, settings={"v": 1}, batch_size=2, save_interval=3600, world_size=3)
    with pytest.raises(RuntimeError):
        sharded_map(inputs, lambda items, first: process(items, first, fail_at=6), rank=1, **common)
    assert seen == ["x4", "x5"]  # rank 1 holds x4..x6 and died at its second batch
    assert sharded_map(inputs, process, rank=2, **common) is None
    assert sharded_map(inputs, process, rank=1, **common) is None
    assert seen == ["x4", "x5", "x7", "x8", "x9", "x6"]  # x4, x5 not redone
    seen.clear()
    assert sharded_map(inputs, process, rank=2, **common) is None  # complete: reused
    assert seen == []
    merged = sharded_map(inputs, process, rank=0, **common)
    assert merged == [{"item": f"x{i}", "index": i} for i in range(10)] == read(output)
    assert not os.path.exists(os.path.dirname(stale))

    seen.clear()
    sharded_map(inputs, process, **{**common, "settings": {"v": 2}, "world_size": 1, "rank": 0})
    assert seen == inputs  # other settings: nothing reused


# -- bad input ----------------------------------------------------------------------------
def _gen_dir(tmp_path, mutate):
    records = json.loads(json.dumps(GEN_RECORDS))
    mutate(records)
    write_split(tmp_path / "bad_sft", "test", records)
    return str(tmp_path / "bad_sft")


BAD_INPUTS = {
    "completions not a list": (
        "src/inference_rm.py", lambda t: ["--data_path", _gen_dir(t, lambda r: r[1].__setitem__("completions", "x"))],
        r"bad_sft/test\.json record 1 field \"completions\": expected list, got str"),
    "completion not a string": (
        "src/calc_logprobs.py", lambda t: ["--data_path", _gen_dir(t, lambda r: r[2]["completions"].append(3))],
        r"record 2 field \"completions\"\[3\]: expected str, got int"),
    "missing gen data": (
        "src/inference_rm.py", lambda t: ["--data_path", str(t / "nowhere_sft")],
        r"--data_path .*nowhere_sft: no such"),
    "missing prompts": (
        "src/inference_sft.py", lambda t: ["--data_name_path", f"toy/sft:{t / 'nowhere'}"],
        r"no test\.json, test\.jsonl, test\.parquet or save_to_disk folder"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model, tmp_path_factory):
    """{case: (CompletedProcess, its directory's files before the run)}: every BAD_INPUTS case in a
    directory of its own, each a process forked from one that paid the imports once (helpers.forked_runs)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    argvs, befores = [], []
    for i, (script, make_flags, _) in enumerate(BAD_INPUTS.values()):
        case_dir = root / f"case{i}"
        case_dir.mkdir()
        flags = make_flags(case_dir)
        befores.append((case_dir, sorted(glob.glob(str(case_dir / "**"), recursive=True))))
        out = ["--output_path", str(case_dir / "out" / "o.json")] if script.endswith("calc_logprobs.py") else \
            ["--output_path", str(case_dir / "out")]
        lengths = ["--max_length", "64", "--max_new_tokens", "16"] if script.endswith("inference_sft.py") else \
            ["--max_seq_len", "64", "--max_gen_len", "16"]  # within the tiny model's 256 positions
        argvs.append([script, "--model_name_or_path", tiny_model, "--split", "test", *lengths, *flags, *out])
    return dict(zip(BAD_INPUTS, zip(forked_runs(root / "forked", argvs), befores)))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_writes_nothing(bad_input_runs, case):
    pattern = BAD_INPUTS[case][2]
    result, (case_dir, before) = bad_input_runs[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(glob.glob(str(case_dir / "**"), recursive=True)) == before  # nothing written


BAD_FLAGS = {
    "prompt_num 0": (["--prompt_num", "0"], r"--prompt_num must be -1 \(all prompts\) or at least 1, got 0"),
    "prompt_num -2": (["--prompt_num", "-2"], r"--prompt_num must be -1 \(all prompts\) or at least 1, got -2"),
    "save_logps with top_k": (["--save_logps", "--top_k", "5"], r"--save_logps needs --top_k 0, --top_p 1\.0"),
    "save_logps with top_p": (["--save_logps", "--top_p", "0.9"], r"--save_logps needs --top_k 0, --top_p 1\.0"),
    "greedy with return_num 2": (["--temp", "0", "--return_num", "2"], r"--temp 0 is greedy decoding"),
    "max_new_tokens too long": (["--max_new_tokens", "32", "--max_length", "32"], r"must be smaller than --max_length"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_sampling_flags_exit_2_with_one_line(tiny_model, prompts_dir, tmp_path, capsys, case):
    """Flag errors stop inference_sft before anything loads (checked in-process: main() exits 2)."""
    from inference_sft import main

    flags, pattern = BAD_FLAGS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_name_or_path", tiny_model, "--data_name_path", f"toy/sft:{prompts_dir}",
              "--output_path", str(tmp_path / "out"), *flags])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2
    assert len(lines) == 1 and re.search(pattern, lines[0]), lines
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_kl_names_the_record_and_field_that_differ(tmp_path):
    good = [{"prompt": "p", "completions": ["a", "b"], "logps": [-1.0, -2.0]}] * 2
    other = json.loads(json.dumps(good))
    other[1]["completions"][1] = "c"
    for name, records in (("policy", good), ("sft", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    result = run(["python", "src/eval_kl.py", str(tmp_path / "policy.json"), str(tmp_path / "sft.json"),
                  "--output_path", str(tmp_path / "kl.json")])
    assert result.returncode == 2
    assert re.fullmatch(r"error: .*sft\.json record 1 field \"completions\": differs from .*policy\.json record 1; .*",
                        result.stderr.strip())
    assert not (tmp_path / "kl.json").exists()
