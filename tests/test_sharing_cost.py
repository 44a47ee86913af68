"""--prefix_sharing auto packs a batch only where that saves work (utils/sharing_cost.py): the
cost rule on the issue's shapes, and the scorers taking the path it chose, with the same
numbers either way."""
import pytest
import torch

from utils import sharing_cost
from utils.data.collators import pad_sequences
from utils.sharing_cost import forward_cost, sharing_saves_work, sharing_summary

# Sequence log-probs here sum ~60 float32 token log-probs to |logp| ~ 300, where one ulp is 3e-5:
# the packed and unpacked forwards may round a few ulps apart (transformers' kernels decide), so
# the bound is relative at that size and absolute near 0.
ATOL, RTOL = 1e-5, 1e-6


def test_cost_rule_packs_long_prompts_and_leaves_short_prompts_with_long_completions():
    hidden = 256  # the bench model's
    # IMDB-shaped: prompt 8, completions 200 (+EOS), K = 4, 2 groups: tokens barely fall, pairs x4
    assert not sharing_saves_work((8, 209), (2, 8 + 4 * 201), hidden)
    # TL;DR-shaped after the group cut: prompt 418, completions ~30, K = 4
    assert sharing_saves_work((8, 448), (2, 418 + 4 * 30), hidden)
    # HH-shaped: prompt 150, completions 50, K = 2
    assert sharing_saves_work((8, 200), (4, 150 + 2 * 50), hidden)
    # the rule itself: tokens at 2 * hidden pairs each, plus width pairs per token
    assert forward_cost(3, 10, 64) == 3 * 10 * (2 * 64 + 10)
    # a wider model weighs tokens more: the same shapes pack once the model is wide enough
    assert not sharing_saves_work((8, 260), (2, 60 + 4 * 200), 256)
    assert sharing_saves_work((8, 260), (2, 60 + 4 * 200), 4096)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from utils.tiny_model import make_tiny_model

    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(20)]
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"), texts, arch="llama", vocab_size=300,
                           hidden_size=64, seed=0)


def one_group(prompt_len, completion_len, k, vocab, seed=0):
    """One group of k rows: a shared prompt and completions of completion_len - i tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
    rows = [prompt + torch.randint(1, vocab, (completion_len - i,), generator=gen).tolist() for i in range(k)]
    batch = pad_sequences(rows, [prompt_len] * k, 0)
    batch["group_sizes"] = [k]
    return batch


# prompt 2 / completions 60 costs more packed at hidden 64; prompt 60 / completions 3 less
SHAPES = {"unshared": (2, 60), "shared": (60, 3)}


@pytest.fixture
def decoder_calls(monkeypatch):
    """How many times the shared path ran (utils.prefix_sharing._packed_hidden_states)."""
    from utils import prefix_sharing

    calls = []
    original = prefix_sharing._packed_hidden_states
    monkeypatch.setattr(prefix_sharing, "_packed_hidden_states", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(sharing_cost, "tally", sharing_cost.collections.Counter())
    monkeypatch.setattr(sharing_cost, "_said", set())
    return calls


@pytest.mark.parametrize("expect", ["unshared", "shared"])
def test_auto_takes_the_cheaper_path_and_on_always_shares(llama, decoder_calls, capsys, expect):
    from transformers import AutoModelForCausalLM
    from utils.logprobs import model_sequence_logprobs

    model = AutoModelForCausalLM.from_pretrained(llama, attn_implementation="sdpa", dtype=torch.float32).eval()
    batch = one_group(*SHAPES[expect], k=4, vocab=model.config.vocab_size)
    with torch.no_grad():
        off = model_sequence_logprobs(model, batch, prefix_sharing=False)
        auto = model_sequence_logprobs(model, batch, prefix_sharing="auto")
        assert len(decoder_calls) == (expect == "shared")
        assert sharing_cost.tally == {expect: 1}
        on = model_sequence_logprobs(model, batch, prefix_sharing="on")
    assert len(decoder_calls) == 1 + (expect == "shared")
    assert sharing_cost.tally == {expect: 1}  # on does not decide
    torch.testing.assert_close(auto, off, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(on, off, rtol=RTOL, atol=ATOL)
    said = "scoring batches unshared where packing costs more" in capsys.readouterr().out
    assert said == (expect == "unshared")
    assert sharing_summary().startswith(f"prefix sharing (auto): {int(expect == 'shared')} of 1 batches shared")


def test_reward_scores_under_auto_score_a_short_prompt_group_unshared(llama, decoder_calls):
    from utils.model_utils import load_reward_model, load_tokenizer
    from utils.reward_scoring import reward_scores

    model = load_reward_model(llama, load_tokenizer(llama)).eval()
    batches = {name: one_group(*shape, k=2, vocab=model.config.vocab_size) for name, shape in SHAPES.items()}
    with torch.no_grad():
        for name, batch in batches.items():
            off = reward_scores(model, batch, False)
            torch.testing.assert_close(reward_scores(model, batch, "auto"), off, rtol=RTOL, atol=ATOL)
    assert sharing_cost.tally == {"unshared": 1, "shared": 1} and len(decoder_calls) == 1
