"""The local tiny-model maker: loadable, small, deterministic, round-tripping, and its CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from utils.tiny_model import ARCHS, EOS, builtin_corpus, make_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]

ROUND_TRIP = [
    "Hello world",
    "  two leading spaces\nand a newline\n",
    "héllo wörld — naïve café, 日本語, emoji 🤖",
    "\ttabs\r\nand CRLF",
]


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "model"
    assert make_tiny_model(out, builtin_corpus(), arch=request.param) == str(out)
    return request.param, out


def test_loads_and_runs_forward(built):
    arch, out = built
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert (out / "model.safetensors").is_file()
    ids = tokenizer("The model reads a short story.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert model.num_parameters() < 2_000_000
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id


def test_tokenizer_specials_and_round_trip(built):
    _, out = built
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == tokenizer.bos_token == EOS
    assert tokenizer.pad_token is None
    assert tokenizer.model_max_length == 256
    for text in ROUND_TRIP:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.eos_token_id not in ids  # nothing added automatically
        assert tokenizer.decode(ids) == text
    # common words of the training text were merged into few tokens
    assert len(tokenizer("The model")["input_ids"]) <= 3


def test_deterministic(built, tmp_path):
    arch, out = built
    again = make_tiny_model(tmp_path / "again", builtin_corpus(), arch=arch)
    first = AutoModelForCausalLM.from_pretrained(out).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in ("tokenizer.json", "model.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_pad_token_when_requested_and_replaces_existing_dir(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    make_tiny_model(out, builtin_corpus(), arch="llama", pad_token="<pad>")
    assert not (out / "stale.txt").exists()
    assert os.listdir(tmp_path) == ["model"]  # no temporary siblings left behind
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.pad_token == "<pad>"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    batch = tokenizer(["short", "a longer sentence here"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2


@pytest.mark.slow
def test_cli_on_jsonl(tmp_path):
    data = tmp_path / "train.jsonl"
    records = [{"prompt": "Human: zorblax quux?", "responses": ["zorblax quux zorblax", "no"], "rewards": [1.0, 0.0]}]
    data.write_text("\n".join(json.dumps(r) for r in records * 20) + "\n")
    out = tmp_path / "cli_model"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "src" / "make_tiny_model.py"), "--out", str(out),
         "--text_file", str(data), "--arch", "gpt_neox", "--vocab_size", "300", "--pad_token", "<pad>"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert str(out) in last and "parameters" in last
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == "<pad>"
    assert len(tokenizer(" zorblax")["input_ids"]) == 1  # learned from the JSONL strings
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "gpt_neox"
