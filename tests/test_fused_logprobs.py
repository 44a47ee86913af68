"""The fused LM head (utils/logprobs.py): log-probs, losses and gradients equal the unfused
path (the model's own logits into utils.logprobs.sequence_logprobs) through real tiny HF models,
tied (GPT-2) and untied (Llama), with LoRA, gradient checkpointing and 2-rank ZeRO-3; a
float64 gradcheck of the autograd Function; the fallback of heads that are more than a matmul."""
import json
import logging
import re

import pytest
import torch
from helpers import REPO_ROOT, launcher, run
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from utils.tiny_model import build_config
from utils import logprobs
from utils.heads import HeadInput
from utils.data.collators import AlignmentCollator
from utils.logprobs import sequence_logprobs
from utils.loss import alignment_loss

F32_TOL = dict(atol=1e-5, rtol=1e-5)
TEMPERATURE = 0.7
GROUPS, K = 3, 2


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 positions at the tiny models' vocabularies, so every case spans several."""
    monkeypatch.setattr(logprobs, "_ROW_CHUNK_ELEMENTS", 3 * 512)


def random_batch(vocab, seed=0):
    """GROUPS groups of K candidates with prompts and completions of varying lengths, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(GROUPS):
        prompt_len = int(torch.randint(2, 7, (1,), generator=gen))
        prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
        candidates = [prompt + torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=gen)),),
                                             generator=gen).tolist() for _ in range(K)]
        examples.append({"input_ids": candidates, "prompt_lens": [prompt_len] * K,
                         "rewards": torch.rand(K, generator=gen).tolist()})
    batch = AlignmentCollator(0)(examples)
    batch["ref_logps"] = -10 * torch.rand(GROUPS, K, generator=gen)  # h != 0, so the loss depends on both
    return batch


def logps_loss_grads(model, batch, fused):
    """One alignment step's log-probs, EXO loss and the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logps = logprobs.model_sequence_logprobs(model, batch, TEMPERATURE, fused=fused)
    loss = alignment_loss(logps.view(GROUPS, K), batch["ref_logps"], batch["rewards"], "exo-rw", 0.5, 0.5)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), loss.detach(), grads


def assert_fused_equals_unfused(model, batch):
    fused, unfused = logps_loss_grads(model, batch, True), logps_loss_grads(model, batch, False)
    torch.testing.assert_close(fused[0], unfused[0], **F32_TOL)
    torch.testing.assert_close(fused[1], unfused[1], **F32_TOL)
    assert fused[2].keys() == unfused[2].keys()
    missing = [name for name, g in unfused[2].items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    for name in unfused[2]:
        torch.testing.assert_close(fused[2][name], unfused[2][name], **F32_TOL, msg=name)
    assert all(g.abs().sum() > 0 for g in unfused[2].values() if g is not None)


def tiny_llama(vocab=300, head_bias=False):
    config = build_config("llama", vocab, 32, 2, 4, 64, {"bos_token_id": 1, "eos_token_id": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if head_bias:  # a head with a bias: nn.Linear still, so fused (bias handled)
        model.lm_head = torch.nn.Linear(32, vocab, bias=True)
        torch.nn.init.normal_(model.lm_head.bias)
    return model


@pytest.fixture(scope="module")
def gpt2(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()  # eval: no dropout
    assert model.lm_head.weight is model.transformer.wte.weight  # tied input and output embeddings
    return model


# -- the autograd Function ------------------------------------------------------------------
def head_case(dtype, seed=0, n=3, t=7, h=5, v=11):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, v, (n, t), generator=gen)
    mask = (torch.rand(n, t, generator=gen) > 0.3).to(dtype)
    mask[1] = 0  # a sequence with nothing in the loss
    return hidden, weight, bias, labels, mask


def test_function_gradcheck_float64(monkeypatch):
    """torch.autograd.gradcheck in hidden, weight and bias, over several row chunks."""
    hidden, weight, bias, labels, mask = head_case(torch.float64)
    monkeypatch.setattr(logprobs, "_ROW_CHUNK_ELEMENTS", 2 * weight.shape[0])
    fn = lambda x, w, b: logprobs.fused_sequence_logprobs(x, w, labels, mask, TEMPERATURE, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(atol=1e-12, rtol=1e-12)), (torch.float32, F32_TOL)])
@pytest.mark.parametrize("chunk_rows", [2, 1000])
def test_function_matches_logits_path(monkeypatch, dtype, tol, chunk_rows):
    """Log-probs and the gradients of hidden, weight and bias equal sequence_logprobs on the logits."""
    hidden, weight, bias, labels, mask = head_case(dtype, seed=1)
    monkeypatch.setattr(logprobs, "_ROW_CHUNK_ELEMENTS", chunk_rows * weight.shape[0])
    fused = logprobs.fused_sequence_logprobs(hidden, weight, labels, mask, TEMPERATURE, bias)
    reference = sequence_logprobs(hidden @ weight.T + bias, labels, mask, TEMPERATURE)
    assert fused.dtype == reference.dtype == dtype
    torch.testing.assert_close(fused, reference, **tol)
    assert fused[1] == 0
    grad_out = torch.randn(3, dtype=dtype)
    for a, b in zip(torch.autograd.grad(fused, (hidden, weight, bias), grad_out),
                    torch.autograd.grad(reference, (hidden, weight, bias), grad_out)):
        torch.testing.assert_close(a, b, **tol)


def test_function_half_precision_reduces_in_float32():
    """bf16 inputs: float32 log-probs, bf16 gradients, close to the float32 computation."""
    hidden, weight, bias, labels, mask = head_case(torch.float32, seed=2)
    as_bf16 = [x.detach().bfloat16().requires_grad_() for x in (hidden, weight, bias)]
    out = logprobs.fused_sequence_logprobs(as_bf16[0], as_bf16[1], labels, mask, TEMPERATURE, as_bf16[2])
    assert out.dtype == torch.float32
    reference = sequence_logprobs(torch.nn.functional.linear(*as_bf16), labels, mask, TEMPERATURE)  # bf16 logits
    torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-3)
    grads = torch.autograd.grad(out.sum(), as_bf16)
    assert all(g.dtype == torch.bfloat16 for g in grads)


# -- through real models --------------------------------------------------------------------
def test_gpt2_tied_embeddings_fused_equals_unfused(gpt2, small_chunks):
    assert_fused_equals_unfused(gpt2, random_batch(gpt2.config.vocab_size))


@pytest.mark.parametrize("head_bias", [False, True])
def test_llama_untied_fused_equals_unfused(small_chunks, head_bias):
    model = tiny_llama(head_bias=head_bias)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_fused_equals_unfused(model, random_batch(300))


def test_gradient_checkpointing_fused_equals_unfused(small_chunks):
    """Fused with activation checkpointing (as --gradient_checkpointing sets it) = unfused without."""
    plain, checkpointed = tiny_llama().train(), tiny_llama().train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = random_batch(300, seed=3)
    fused, unfused = logps_loss_grads(checkpointed, batch, True), logps_loss_grads(plain, batch, False)
    torch.testing.assert_close(fused[1], unfused[1], **F32_TOL)
    for name in unfused[2]:
        torch.testing.assert_close(fused[2][name], unfused[2][name], **F32_TOL, msg=name)


def test_lora_never_wraps_the_head_and_fused_equals_unfused(small_chunks):
    from utils.model_utils import apply_lora

    model = apply_lora(tiny_llama(), 4)  # --lora_module_name all-linear, the default
    head, why = logprobs.lm_head(model)
    assert why is None and type(head) is torch.nn.Linear
    assert head is model.get_base_model().lm_head
    assert not any("lm_head" in name for name, _ in model.named_parameters() if "lora_" in name)
    for name, p in model.named_parameters():  # LoRA B starts at 0: give the adapters an effect to check
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert_fused_equals_unfused(model, random_batch(300, seed=4))


# The real shared-prefix producer composed with this head reduction is tested against the plain
# path in tests/test_prefix_sharing.py (test_shared_prefix_and_fused_head_together_equal_neither).


def test_softcapped_head_falls_back_to_the_unfused_path_once(caplog):
    """A head followed by logit soft-capping (Gemma 2) is not fused: one logged line, the same
    log-probs as the unfused path, and no silent use with prefix sharing."""
    config = AutoConfig.for_model("gemma2", vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                  final_logit_softcapping=1.0)  # small cap: far from the identity
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits of order 1 and more, where the cap bites
    head, why = logprobs.lm_head(model)
    assert head is None and "final_logit_softcapping" in why
    batch = random_batch(128, seed=6)
    logprobs._fallback_logged.clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="utils.logprobs"):
        fused = [logprobs.model_sequence_logprobs(model, batch, TEMPERATURE) for _ in range(2)]
        unfused = logprobs.model_sequence_logprobs(model, batch, TEMPERATURE, fused=False)
    assert [r.getMessage() for r in caplog.records if "unfused path" in r.getMessage()] == [
        "fused log-probs: Gemma2ForCausalLM: its logits are transformed after the head "
        "(final_logit_softcapping=1.0); using the unfused path (full logits)"]
    torch.testing.assert_close(fused[0], unfused, atol=0, rtol=0)
    # and the check matters: the plain matmul of the head would give other log-probs
    hidden, labels, mask = logprobs.prompt_cut_hidden_states(HeadInput(model, model.lm_head), batch)
    plain = logprobs.fused_sequence_logprobs(hidden.detach(), model.lm_head.weight, labels, mask, TEMPERATURE)
    assert (plain - unfused).abs().max() > 1
    with pytest.raises(ValueError, match="prefix sharing"):
        logprobs.model_sequence_logprobs(model, batch, prefix_sharing=True)


def test_head_with_a_forward_hook_falls_back(gpt2):
    """A hook that changes the head's output (here a bias on one logit) is not bypassed."""
    bias = torch.zeros(gpt2.config.vocab_size)
    bias[3] = 5.0
    handle = gpt2.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        head, why = logprobs.lm_head(gpt2)
        assert head is None and "forward hooks" in why
        batch = random_batch(gpt2.config.vocab_size, seed=7)
        with torch.no_grad():
            torch.testing.assert_close(logprobs.model_sequence_logprobs(gpt2, batch),
                                       logprobs.model_sequence_logprobs(gpt2, batch, fused=False), atol=0, rtol=0)
    finally:
        handle.remove()
    assert logprobs.lm_head(gpt2)[0] is gpt2.lm_head


@pytest.mark.parametrize("stage", ["train_exo", "train_sft"])
def test_flag_defaults_on_and_turns_off(stage, tiny_model):
    module = __import__(stage)
    base = ["--model_name_or_path", tiny_model, "--data_name_path", "x/sft:d", "--output_dir", "o",
            "--max_seq_len", "64", "--max_gen_len", "32"]
    assert module.parse_args(base).fused_logprobs is True
    assert module.parse_args(base + ["--no-fused_logprobs"]).fused_logprobs is False


def test_calc_logprobs_flag():
    import calc_logprobs

    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_path", "o.json"]
    assert calc_logprobs.parse_args(base).fused_logprobs is True
    assert calc_logprobs.parse_args(base + ["--no-fused_logprobs"]).fused_logprobs is False


@pytest.mark.parametrize("arch,head_key", [("gpt2", "transformer.wte.weight"), ("gpt_neox", "embed_out.weight"),
                                           ("llama", "lm_head.weight")])
@pytest.mark.slow
def test_zero3_two_ranks_fused_equals_unfused(arch, head_key, tiny_model_of, align_data, tmp_path):
    """train_exo under ZeRO-3 on 2 CPU ranks (the head weight partitioned, the reference online
    and partitioned too), fused and unfused from the same start: the same losses of both steps
    and head weights. GPT-2's head is tied to the input embedding; GPT-NeoX's and Llama's are not
    (the fused head's backward once failed on an untied, partitioned head)."""
    model = tiny_model_of(arch)
    common = ["--model_name_or_path", model, "--data_name_path", f"toy/rw:{align_data['rw']}",
              "--max_seq_len", "48", "--max_gen_len", "16", "--per_device_train_batch_size", "4",
              "--per_device_eval_batch_size", "8", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
              "--seed", "7", "--zero_stage", "3", "--loss_type", "exo-rw", "--num_contrastive", "2",
              "--max_iter_step", "2", "--ref_logps", "online", "--temp", str(TEMPERATURE), "--print_loss"]
    argvs = [common + ["--output_dir", str(tmp_path / name), "--data_output_path", str(tmp_path / f"{name}_cache"),
                       flag] for name, flag in (("fused", "--fused_logprobs"), ("unfused", "--no-fused_logprobs"))]
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    result = run([*launcher(2), "tests/run_mains.py", "src/train_exo.py", str(tmp_path / "argvs.json")], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "unfused path" not in result.stderr  # the fused run did fuse
    losses = [float(v) for v in re.findall(r"\[train step \d+\] loss=([-\d.e]+)", result.stdout)]
    assert len(losses) == 4, losses  # 2 steps of the fused run, then of the unfused one
    assert losses[:2] == pytest.approx(losses[2:], rel=1e-5)
    initial = load_file(f"{model}/model.safetensors")
    assert initial[head_key].numel() > 1e4  # above stage3_param_persistence_threshold: the head is partitioned
    fused, unfused = (load_file(tmp_path / name / "model.safetensors") for name in ("fused", "unfused"))
    assert max((fused[k] - initial[k]).abs().max() for k in initial) > 1e-3  # training moved the weights
    # Adam turns rounding noise in a gradient that is 0 in exact arithmetic (a key bias: softmax
    # is shift-invariant) into updates of order lr, so the weights are compared through what
    # they compute (the second step's loss, above) and, for the head, directly
    torch.testing.assert_close(fused[head_key], unfused[head_key], **F32_TOL)


HEADS = ["tied", "untied", "bias"]


@pytest.fixture(scope="module")
def zero3_heads_results(tmp_path_factory):
    """tests/zero3_heads.py's results for every head of HEADS, from one 2-rank launch."""
    out = tmp_path_factory.mktemp("zero3_heads") / "results.pt"
    result = run([*launcher(2), "tests/zero3_heads.py", ",".join(HEADS), str(out)], timeout=600,
                 env={"PYTHONPATH": f"{REPO_ROOT / 'src'}:{REPO_ROOT / 'tests'}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_zero3_two_ranks_every_head(head, zero3_heads_results):
    """Under 2-rank ZeRO-3, a tied head, an untied one and an untied one with a bias: the fused
    head's log-probs and the weights after one step equal the unfused path's (tests/zero3_heads.py)."""
    results = zero3_heads_results[head]
    (logps_f, fused), (logps_u, unfused) = results["fused"], results["unfused"]
    torch.testing.assert_close(logps_f, logps_u, **F32_TOL)
    from zero3_heads import build

    initial = {name: p.detach() for name, p in build(head).named_parameters()}
    assert max(float((unfused[n] - initial[n]).abs().max()) for n in initial) > 1e-3  # the step moved them
    for name in unfused:
        torch.testing.assert_close(fused[name], unfused[name], **F32_TOL, msg=name)

