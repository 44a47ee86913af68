"""inference_sft --backend vllm: the same records as the HF sampler, log-probs that calc_logprobs
reproduces, the same sharded and resumable map (2 CPU ranks, a SIGKILLed run resumed), the
enumerated KL of tests/test_token_exact.py, and online rounds that sample each round's policy
export with a fresh engine.

Marked `vllm`: they run where vllm is installed (CI makes a venv of its own for them: .ci/run,
README: Tests) and are skipped elsewhere, saying so; EXO_ALIGN_REQUIRE_VLLM=1 makes a missing
vllm a failure instead. vLLM's CPU attention needs head_dim >= 32, hence the models here.
"""
import glob
import importlib.util
import os
import signal
import time

import pytest
from helpers import NEGATIVE, POSITIVE, WORDS, launcher, ok, read, run, start, write_split

from utils.model_utils import load_tokenizer

# every test here starts processes: the slow tier (conftest.py enforces the mark)
pytestmark = pytest.mark.slow

HAS_VLLM = importlib.util.find_spec("vllm") is not None
if not HAS_VLLM and os.environ.get("EXO_ALIGN_REQUIRE_VLLM") == "1":
    raise ImportError("EXO_ALIGN_REQUIRE_VLLM=1 but vllm cannot be imported in this environment")
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed here; .ci/run runs these in its "
                                "vLLM venv (.venv-vllm: python -m pytest -m vllm tests)")

FLAGS = ["--split", "test", "--return_num", "3", "--temp", "0.8", "--max_new_tokens", "8", "--max_length", "24",
         "--seed", "5", "--save_logps"]
NUM_PROMPTS = 11
# vLLM's processed log-probs against calc_logprobs' HF forward, per completion (<= 8 tokens),
# fp32; measured at most 4.3e-6 (the Llama here, 33 completions) and 1.6e-6 (the 6-token GPT-2, 3000)
LOGP_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from utils.tiny_model import make_tiny_model

    texts = [" ".join(WORDS + POSITIVE + NEGATIVE)] * 4
    return make_tiny_model(str(tmp_path_factory.mktemp("vllm_llama") / "llama"), texts, arch="llama",
                           hidden_size=64, num_heads=2, seed=0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    vocab = WORDS + POSITIVE + NEGATIVE
    directory = tmp_path_factory.mktemp("vllm_prompts") / "toy"
    records = [{"prompt": " ".join(vocab[(i * 5 + j) % len(vocab)] for j in range(2 + i % 6)), "chosen": "good"}
               for i in range(NUM_PROMPTS - 1)] + [{"prompt": "the " * 30 + "end", "chosen": "bad"}]  # cut on the left
    write_split(directory, "test", records)
    return str(directory)


def sample_command(model, data, out, *flags, ranks=1):
    return [*launcher(ranks), "src/inference_sft.py", "--model_name_or_path", model, "--data_name_path",
            f"toy/sft:{data}", "--output_path", str(out), *FLAGS, *flags]


@pytest.fixture(scope="module")
def two_ranks(llama, prompts, tmp_path_factory):
    """vLLM on 2 CPU ranks, batch 2: the output directory."""
    out = tmp_path_factory.mktemp("vllm_two") / "toy_sft"
    ok(run(sample_command(llama, prompts, out, "--backend", "vllm", "--batch_size", "2", ranks=2), timeout=900))
    return out


@needs_vllm
@pytest.mark.vllm
def test_vllm_records_are_the_hf_records(llama, prompts, two_ranks, tmp_path):
    hf_out = tmp_path / "hf"
    ok(run(sample_command(llama, prompts, hf_out, "--batch_size", "4")))
    vllm_records, hf_records = read(two_ranks / "test.json"), read(hf_out / "test.json")
    eos = load_tokenizer(llama).eos_token_id
    assert len(vllm_records) == len(hf_records) == NUM_PROMPTS
    for v, h in zip(vllm_records, hf_records):
        assert v.keys() == h.keys() and v["prompt"] == h["prompt"]
        assert v["tokenizer_fingerprint"] == h["tokenizer_fingerprint"] and v["source_model"] == h["source_model"]
        assert len(v["completions"]) == len(v["completion_ids"]) == len(v["logps"]) == 3
        for ids, stop in zip(v["completion_ids"], v["stop_token"]):  # EOS ends a completion, and only there
            assert ids.count(eos) == (stop is not None) and (stop is None or (stop == eos and ids[-1] == eos))
            assert 1 <= len(ids) <= 8 and (stop is not None or len(ids) == 8)
    assert len({tuple(ids) for r in vllm_records for ids in r["completion_ids"]}) > 0.9 * 3 * NUM_PROMPTS


@needs_vllm
@pytest.mark.vllm
def test_vllm_logps_are_the_models_at_temp(llama, two_ranks, tmp_path):
    out = tmp_path / "scored.json"
    ok(run(["python", "src/calc_logprobs.py", "--model_name_or_path", llama, "--data_path", str(two_ranks),
            "--split", "test", "--max_seq_len", "24", "--max_gen_len", "8", "--temp", "0.8", "--output_path", str(out)]))
    sampled, scored = read(two_ranks / "test.json"), read(out)
    diffs = [abs(a - b) for r, s in zip(sampled, scored) for a, b in zip(r["logps"], s["logps"])]
    print(f"vLLM vs calc_logprobs, per completion: max |diff| {max(diffs):.2e} over {len(diffs)}")
    assert max(diffs) < LOGP_TOLERANCE
    assert [r["scored_tokens"] for r in sampled] == [s["scored_tokens"] for s in scored]


@needs_vllm
@pytest.mark.vllm
def test_vllm_killed_run_resumes_to_the_two_rank_file(llama, prompts, two_ranks, tmp_path):
    """Seeds are per completion: one rank with batch 1, SIGKILLed after some batches and rerun,
    writes the file the two ranks with batch 2 wrote."""
    out = tmp_path / "toy_sft"
    cmd = sample_command(llama, prompts, out, "--backend", "vllm", "--batch_size", "1", "--save_interval", "0")
    process = start(cmd)
    deadline = time.monotonic() + 600
    partial = None
    while time.monotonic() < deadline and process.poll() is None:
        for path in glob.glob(str(out / ".shards" / "*.json")):
            try:
                shard = read(path)
            except ValueError:
                continue
            if 2 <= len(shard["outputs"]) and not shard["complete"]:
                os.killpg(process.pid, signal.SIGKILL)
                partial = len(shard["outputs"])
        if partial:
            break
        time.sleep(0.05)
    process.communicate(timeout=60)
    assert partial, "the run finished (or failed) before it could be killed mid-way"
    assert not (out / "test.json").exists()
    resumed = ok(run(cmd, timeout=900))
    assert f"resuming its shard at {partial}" in resumed.stderr + resumed.stdout
    assert read(out / "test.json") == read(two_ranks / "test.json")


@needs_vllm
@pytest.mark.vllm
def test_vllm_pipeline_kl_estimate_agrees_with_the_enumerated_kl(tmp_path):
    from test_token_exact import RETURN_NUM, WORDS, exact_kl, run_pipeline, tiny_vocab_model, PROMPTS

    # a padded vocabulary (3 head rows past the tokenizer): the engine must never draw them, and
    # its log-probs must leave them out of the normaliser, as calc_logprobs does
    sft = tiny_vocab_model(tmp_path / "sft", seed=0, n_embd=64, scale=0.03, padding=3)
    policy = tiny_vocab_model(tmp_path / "policy", seed=1, noise_from=sft, n_embd=64, scale=0.03)
    paths = run_pipeline(tmp_path, sft, policy, backend="vllm")
    values = [exact_kl(policy, sft, p) for p in PROMPTS]
    kl, p_cut = sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values)
    stops = [s for r in read(paths["gen"]) for s in r["stop_token"]]
    assert len(stops) == len(PROMPTS) * RETURN_NUM
    assert max(i for r in read(paths["gen"]) for ids in r["completion_ids"] for i in ids) <= len(WORDS)
    assert 0.25 < stops.count(None) / len(stops) < 0.75 and 0.25 < p_cut < 0.75
    estimate = read(paths["gen_kl"])
    print(f"exact KL {kl:.4f}; vLLM-sampled estimate {estimate['kl']:.4f} +- {estimate['se']:.4f}")
    assert abs(estimate["kl"] - kl) < 3 * estimate["se"] and estimate["se"] < 0.1 * kl
    sampled, scored = read(paths["gen"]), read(paths["gen_policy"])
    assert max(abs(a - b) for r, s in zip(sampled, scored) for a, b in zip(r["logps"], s["logps"])) < LOGP_TOLERANCE


@needs_vllm
@pytest.mark.vllm
def test_online_rounds_sample_each_policy_export_with_vllm(llama, tmp_path):
    """Two rounds, 1 CPU rank, LoRA training (exports merged): round 2's engine loads round 1's
    policy; only the sampling stages use vLLM."""
    import torch
    from utils.model_utils import load_reward_model, load_tokenizer

    vocab = WORDS + POSITIVE + NEGATIVE
    prompts = tmp_path / "prompts"
    for split, n in (("train", 8), ("test", 4)):
        write_split(prompts, split, [{"prompt": " ".join(vocab[(i * 3 + j) % len(vocab)] for j in range(3)),
                                      "chosen": "good"} for i in range(n)])
    rm = str(tmp_path / "rm")
    tokenizer = load_tokenizer(llama)
    torch.manual_seed(0)
    load_reward_model(llama, tokenizer).save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    out = tmp_path / "online"
    ok(run(["bash", "exp/online_exp/run.sh", "--sft_model", llama, "--reward_model", rm, "--data_name_path",
            f"toy/sft:{prompts}", "--output_dir", str(out), "--rounds", "2", "--num_samples", "2",
            "--max_new_tokens", "6", "--max_length", "16", "--max_iter_step", "2", "--num_save_checkpoint", "1",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
            "--zero_stage", "0", "--no-gradient_checkpointing", "--eval_batch_size", "8",
            "--sampling_backend", "vllm", "--train_args", "--lora_dim 4"], env={"DEVICE_IDS": "0"}, timeout=1500))
    for r, source in ((1, llama), (2, None)):
        manifest = read(out / f"round{r}" / "manifest.json")
        source = source or read(out / "round1" / "manifest.json")["policy"]
        assert os.path.realpath(manifest["source_model"]) == os.path.realpath(source)
        records = read(out / f"round{r}" / "samples" / "train.json")
        assert {os.path.realpath(x["source_model"]) for x in records} == {os.path.realpath(source)}
    # the sampling launcher's log (beside the prompts' link): one engine start per round
    log = (out / "data" / "prompts_sft" / "inference_sft_train.log").read_text()
    assert log.count("Using external launcher") == 2
    assert len(read(out / "results.json")["rows"]) == 2


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_one_line(llama, prompts, tmp_path):
    done = run(sample_command(llama, prompts, tmp_path / "out", "--backend", "vllm"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "--backend vllm: vllm cannot be imported" in done.stderr and "README: Install" in done.stderr
    assert not (tmp_path / "out").exists()


def test_sharded_map_replica_computes_its_slice_and_writes_nothing(tmp_path):
    """The other ranks of a tensor-parallel engine: they run the slice of the rank they copy
    (resuming where its shard was saved) but save, merge and return nothing."""
    from utils.sharding import sharded_map

    inputs = [f"x{i}" for i in range(6)]
    output = tmp_path / "out" / "test.json"
    seen = []

    def process(items, first_index):
        seen.extend(items)
        return [{"item": item} for item in items]

    common = dict(output_file=output, settings={}, batch_size=2, save_interval=0, world_size=2)
    assert sharded_map(inputs, process, rank=1, replica=True, **common) is None
    assert seen == ["x3", "x4", "x5"] and not (tmp_path / "out").exists()
    assert sharded_map(inputs, process, rank=1, **common) is None  # the rank it copies saves
    seen.clear()
    assert sharded_map(inputs, process, rank=1, replica=True, **common) is None
    assert seen == []  # its shard is complete: reused, as that rank reuses it
    assert sharded_map(inputs, process, rank=0, replica=True, **common) is None and not output.exists()
    assert sharded_map(inputs, process, rank=0, **common) == [{"item": x} for x in inputs]
