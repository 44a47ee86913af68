"""Prefix sharing is exact: per-sequence log-probs, losses, gradients and reward-model scores
of the packed forward (each group's prompt encoded once) equal the unshared forward to 1e-5
in float32, through real tiny GPT-2 and Llama models; and the stages' --prefix_sharing flag."""
import random
import re

import pytest
import torch
from helpers import launcher, ok, run

from utils.logprobs import sequence_logprobs
from utils.loss import alignment_loss
from utils.data.collators import AlignmentCollator, pad_sequences
from utils.heads import HeadInput
from utils.prefix_sharing import pack_groups, resolve_prefix_sharing, shared_prefix_hidden_states, sharing_support
from utils.reward_scoring import shared_prefix_scores

ATOL = 1e-5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def arch_model(request, tmp_path_factory):
    from utils.tiny_model import make_tiny_model

    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(20)]
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / request.param), texts, arch=request.param,
                           vocab_size=300, seed=0)


def load_lm(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()


def group_batch(groups, k, vocab, seed, pad_id=0):
    """`groups` groups of `k` rows, group-major, with prompt lengths varying across groups
    (right-varying), some rows' prompts cut on the left (left-varying within a group, as the
    tokenisation rule does to fit a long completion), and completion lengths varying."""
    rng = random.Random(seed)
    sequences, prompt_lens = [], []
    for g in range(groups):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(3, 14))]
        for i in range(k):
            cut = rng.choice([0, 0, 1, 3]) if g % 2 else 0  # odd groups: some prompts cut on the left
            completion = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 9))]
            p = prompt[min(cut, len(prompt) - 1):]
            sequences.append(p + completion)
            prompt_lens.append(len(p))
    batch = pad_sequences(sequences, prompt_lens, pad_id)
    batch["group_sizes"] = [k] * groups
    batch["rewards"] = torch.randn(groups, k, generator=torch.Generator().manual_seed(seed))
    return batch


def unshared_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])


def shared_logps(model, batch):
    """The interface: head input of the packed forward -> LM head -> log-probs."""
    hidden, labels, loss_mask = shared_prefix_hidden_states(HeadInput(model), batch)
    return sequence_logprobs(model.get_output_embeddings()(hidden), labels, loss_mask)


def loss_and_grads(model, batch, logps_fn):
    model.zero_grad()
    groups, k = batch["rewards"].shape
    logps = logps_fn(model, batch).view(groups, k)
    loss = alignment_loss(logps, torch.zeros_like(logps), batch["rewards"], "exo-rw", 0.5, 0.5)
    loss.backward()
    return logps.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(shared, unshared):
    (logps_s, loss_s, grads_s), (logps_u, loss_u, grads_u) = shared, unshared
    torch.testing.assert_close(logps_s, logps_u, rtol=0, atol=ATOL)
    torch.testing.assert_close(loss_s, loss_u, rtol=0, atol=ATOL)
    assert grads_s.keys() == grads_u.keys() and grads_s
    for name in grads_u:
        torch.testing.assert_close(grads_s[name], grads_u[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logprobs_losses_and_gradients_equal_the_unshared_forward(arch_model, k, attn):
    model = load_lm(arch_model, attn)
    batch = group_batch(groups=3, k=k, vocab=model.config.vocab_size, seed=k)
    packed = pack_groups(batch)
    assert packed.input_ids.numel() < batch["input_ids"].numel()  # something was shared
    assert_same(loss_and_grads(model, batch, shared_logps), loss_and_grads(model, batch, unshared_logps))


def test_rows_with_nothing_in_common_and_cut_prompts_share_only_what_is_common(arch_model):
    """A group whose rows differ from their first token shares nothing and is still exact; a
    group whose prompts were cut on the left shares the common part only."""
    model = load_lm(arch_model)
    batch = pad_sequences([[5, 6, 7, 8], [9, 6, 7, 10, 11], [1, 2, 3, 4, 5], [2, 3, 4, 6]], [2, 3, 4, 3], 0)
    batch["group_sizes"] = [2, 2]
    packed = pack_groups(batch)
    assert packed.row_prefix.tolist() == [0, 0, 0, 0]  # group 2 [1,2,3 | 2,3,4]: differs at token 0
    batch2 = pad_sequences([[1, 2, 3, 4, 5], [1, 2, 3, 7], [1, 2, 8, 9, 9, 9]], [4, 3, 2], 0)
    batch2["group_sizes"] = [3]
    assert pack_groups(batch2).row_prefix.tolist() == [2, 2, 2]  # capped at the first loss position
    for b in (batch, batch2):
        with torch.no_grad():
            torch.testing.assert_close(shared_logps(model, b), unshared_logps(model, b), rtol=0, atol=ATOL)


def test_model_sequence_logprobs_through_the_top_module_and_the_collator(arch_model):
    """The stages' path: model_sequence_logprobs(prefix_sharing=True) runs the backbone through
    the model's own forward (HeadInput) and reads the group sizes AlignmentCollator adds."""
    from utils.logprobs import model_sequence_logprobs

    model = load_lm(arch_model)
    rng = random.Random(0)
    examples = []
    for _ in range(3):
        prompt = [rng.randrange(1, 200) for _ in range(rng.randint(4, 12))]
        rows = [prompt + [rng.randrange(1, 200) for _ in range(rng.randint(1, 6))] for _ in range(4)]
        examples.append({"input_ids": rows, "prompt_lens": [len(prompt)] * 4, "rewards": [0.0, 1.0, 2.0, 3.0]})
    batch = AlignmentCollator(0)(examples)
    assert batch["group_sizes"] == [4, 4, 4]
    with torch.no_grad():
        torch.testing.assert_close(model_sequence_logprobs(model, batch, 0.7, prefix_sharing=True),
                                   model_sequence_logprobs(model, batch, 0.7), rtol=0, atol=ATOL)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_shared_prefix_and_fused_head_together_equal_neither(arch_model, k):
    """The two halves of the one log-prob path composed: each group's prompt encoded once and
    the LM head reduced without logits give the log-probs, loss and every parameter's gradient
    of the plain path (unshared forward, full logits), at a temperature other than 1."""
    from utils.logprobs import model_sequence_logprobs

    model = load_lm(arch_model)
    batch = group_batch(groups=2, k=k, vocab=model.config.vocab_size, seed=k)
    both = loss_and_grads(model, batch, lambda m, b: model_sequence_logprobs(m, b, 0.7, fused=True,
                                                                             prefix_sharing=True))
    neither = loss_and_grads(model, batch, lambda m, b: model_sequence_logprobs(m, b, 0.7, fused=False,
                                                                                prefix_sharing=False))
    assert_same(both, neither)


def test_reward_model_scores_and_gradients_equal_the_unshared_forward(arch_model):
    from utils.model_utils import load_reward_model, load_tokenizer

    model = load_reward_model(arch_model, load_tokenizer(arch_model)).eval()
    batch = group_batch(groups=3, k=2, vocab=model.config.vocab_size, seed=1, pad_id=model.config.pad_token_id)
    results = []
    for score in (shared_prefix_scores, lambda m, b: m(input_ids=b["input_ids"],
                                                        attention_mask=b["attention_mask"]).logits[:, 0]):
        model.zero_grad()
        scores = score(model, batch)
        chosen, rejected = scores.view(-1, 2).unbind(-1)
        torch.nn.functional.logsigmoid(chosen - rejected).mean().neg().backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}))
    (shared, grads_s), (unshared, grads_u) = results
    torch.testing.assert_close(shared, unshared, rtol=0, atol=ATOL)
    for name in grads_u:
        torch.testing.assert_close(grads_s[name], grads_u[name], rtol=0, atol=ATOL, msg=name)


def test_lora_with_gradient_checkpointing_in_training_mode_is_exact(tiny_model):
    """LoRA adapters and non-reentrant activation checkpointing (as --gradient_checkpointing
    sets it), in train mode, through the wrapped model."""
    from utils.logprobs import model_sequence_logprobs
    from utils.model_utils import apply_lora, load_causal_lm, load_tokenizer

    model = apply_lora(load_causal_lm(tiny_model, load_tokenizer(tiny_model), disable_dropout=True), 4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = group_batch(groups=2, k=4, vocab=200, seed=3)
    assert_same(loss_and_grads(model, batch, lambda m, b: model_sequence_logprobs(m, b, prefix_sharing=True)),
                loss_and_grads(model, batch, lambda m, b: model_sequence_logprobs(m, b)))


def test_unsupported_models_are_explained_and_on_refuses_them(arch_model, capsys):
    from utils.fileio import InputError

    assert sharing_support(load_lm(arch_model, "sdpa")) is None
    model = load_lm(arch_model, "eager")
    model.config._attn_implementation = "flash_attention_2"  # the check reads only the config
    reason = sharing_support(model)
    assert "flash_attention_2" in reason
    assert resolve_prefix_sharing("auto", model) is False
    assert reason in capsys.readouterr().out
    assert resolve_prefix_sharing("off", model) is False
    with pytest.raises(InputError, match="--prefix_sharing on"):
        resolve_prefix_sharing("on", model)
    assert HeadInput(model).head is model.get_output_embeddings()


# -- the stages' --prefix_sharing ------------------------------------------------------------
@pytest.fixture(scope="module")
def stages_root(tmp_path_factory):
    """The directory `stage_runs` writes its inputs and outputs in."""
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def stage_runs(tiny_model, easy_pref_data, stages_root):
    """Every stage that scores groups, with sharing on and off (and auto/on with a model that
    cannot share), forked from one process that paid the imports once (tests/forked_cli.py):
    {name: CompletedProcess (exit code, stdout, stderr)}; they write in `stages_root`."""
    import json
    import subprocess

    from helpers import REPO_ROOT, WORDS, write_split
    from transformers import BloomConfig, BloomForCausalLM
    from utils.model_utils import load_reward_model, load_tokenizer

    root = stages_root
    rng = random.Random(5)
    gen = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))),
            "completions": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
                            for _ in range(rng.randint(2, 5))]} for _ in range(10)]  # 2-5 completions each
    write_split(str(root / "gen_sft"), "test", gen)
    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    load_reward_model(tiny_model, tokenizer).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2)).save_pretrained(
        root / "bloom")
    tokenizer.save_pretrained(root / "bloom")

    lengths = ["--max_seq_len", "128", "--max_gen_len", "32"]
    data = ["--data_path", str(root / "gen_sft"), "--split", "test", "--batch_size", "3", *lengths]
    train_rm = ["src/train_rm.py", "--model_name_or_path", tiny_model, "--data_name_path", f"p/pref:{easy_pref_data}",
                *lengths, "--max_iter_step", "2", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32",
                "--print_loss", "--learning_rate", "1e-3", "--lora_dim", "4", "--gradient_checkpointing",
                "--disable_dropout"]  # dropout would draw different masks for a packed row
    cases = {}
    for mode in ("on", "off"):
        cases[f"logps_{mode}"] = ["src/calc_logprobs.py", "--model_name_or_path", tiny_model, *data, "--temp", "0.8",
                                  "--output_path", str(root / f"logps_{mode}.json"), "--prefix_sharing", mode]
        cases[f"rm_{mode}"] = ["src/inference_rm.py", "--model_name_or_path", str(root / "rm"), *data, "--mode",
                               "label", "--output_path", str(root / f"rw_{mode}"), "--prefix_sharing", mode]
        cases[f"train_rm_{mode}"] = [*train_rm, "--output_dir", str(root / f"rm_train_{mode}"), "--data_output_path",
                                     str(root / f"cache_{mode}"), "--prefix_sharing", mode]
    for mode in ("on", "auto"):
        cases[f"bloom_{mode}"] = ["src/calc_logprobs.py", "--model_name_or_path", str(root / "bloom"), *data,
                                  "--output_path", str(root / f"bloom_{mode}.json"), "--prefix_sharing", mode]
    (root / "cases.json").write_text(json.dumps([{"argv": argv} for argv in cases.values()]))
    (root / "results").mkdir()
    result = run(["python", str(REPO_ROOT / "tests" / "forked_cli.py"), str(root / "cases.json"), str(root / "results")],
                 timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    codes = json.loads((root / "results" / "results.json").read_text())
    return {name: subprocess.CompletedProcess(argv, codes[i], (root / "results" / f"{i}.out").read_text(),
                                              (root / "results" / f"{i}.err").read_text())
            for i, (name, argv) in enumerate(cases.items())}


@pytest.mark.slow
def test_calc_logprobs_and_inference_rm_write_the_same_numbers_with_sharing(stage_runs, stages_root):
    import json

    ok(stage_runs["logps_on"]), ok(stage_runs["logps_off"])
    root = stages_root
    for on, off, field in (("logps_on.json", "logps_off.json", "logps"),
                           ("rw_on/test.json", "rw_off/test.json", "rewards")):
        if field == "rewards":
            ok(stage_runs["rm_on"]), ok(stage_runs["rm_off"])
        shared, unshared = (json.loads((root / name).read_text()) for name in (on, off))
        assert [len(r[field]) for r in shared] == [len(r["completions"]) for r in unshared]
        for a, b in zip(shared, unshared):
            assert a[field] == pytest.approx(b[field], abs=1e-5)


@pytest.mark.slow
def test_train_rm_trains_the_same_with_sharing_lora_and_checkpointing(stage_runs):
    def losses(out):
        return [float(v) for v in re.findall(r"\[(?:train|eval) step \d+\] loss=([-\d.e]+)", out)]

    on, off = losses(ok(stage_runs["train_rm_on"]).stdout), losses(ok(stage_runs["train_rm_off"]).stdout)
    assert len(on) == len(off) >= 4  # eval 0, train 1, 2, eval 2
    assert on == pytest.approx(off, rel=1e-4)


@pytest.mark.slow
def test_a_model_that_cannot_share_falls_back_under_auto_and_stops_under_on(stage_runs, stages_root):
    code, out, err = stage_runs["bloom_on"].returncode, stage_runs["bloom_on"].stdout, stage_runs["bloom_on"].stderr
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: --prefix_sharing on") and err.strip().endswith(errors[0])
    assert not (stages_root / "bloom_on.json").exists()
    out = ok(stage_runs["bloom_auto"]).stdout
    assert len(re.findall(r"prefix sharing off for the model: .*ALiBi", out)) == 1, out


@pytest.mark.slow
def test_two_rank_zero3_train_exo_with_sharing_matches_without(tiny_model, align_data, tmp_path):
    """One 2-rank ZeRO-3 run with the online reference and --group_by_length, sharing on (and
    auto, whose ranks agree on each batch's path) vs off: the same eval and train losses (to the
    6 digits logged)."""
    import json

    modes = ("on", "auto", "off")
    argvs = [["--model_name_or_path", tiny_model, "--data_name_path", f"toy/rw:{align_data['rw']}",
              "--output_dir", str(tmp_path / mode), "--data_output_path", str(tmp_path / "cache"), "--zero_stage", "3",
              "--loss_type", "exo-rw", "--num_contrastive", "4", "--ref_logps", "online", "--group_by_length",
              "--max_iter_step", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
              "--max_seq_len", "48", "--max_gen_len", "16", "--learning_rate", "5e-3", "--print_loss", "--seed", "7",
              "--prefix_sharing", mode] for mode in modes]
    # the three runs one after the other in one launch (tests/run_mains.py: one start-up)
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    result = run([*launcher(2), "tests/run_mains.py", "src/train_exo.py", str(tmp_path / "argvs.json")], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = result.stdout.split("saved the final model")
    assert len(outputs) == len(modes) + 1, result.stdout[-3000:]
    results = {mode: re.findall(r"\[(train|eval) step (\d+)\] loss=([-\d.e]+)", output)
               for mode, output in zip(modes, outputs)}
    assert len(results["on"]) >= 4
    assert [r[:2] for r in results["on"]] == [r[:2] for r in results["off"]]
    for mode in ("on", "auto"):
        assert [float(r[2]) for r in results[mode]] == pytest.approx([float(r[2]) for r in results["off"]], rel=1e-4)
