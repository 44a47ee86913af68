"""Each recipe's README, run end to end: every command after the download, in order, on a
tiny local model and raw fixture data in the real formats (tests/recipe_fixtures.py).

The README's setup block reads its paths and extra flags from the environment, so the script
run here is the README's text itself; the tiny sizes ride in TRAIN / SAMPLE / SCORE.
"""
import json
import re

import pytest
from helpers import REPO_ROOT, run

import recipe_fixtures

# every test here starts processes: the slow tier (conftest.py enforces the mark)
pytestmark = pytest.mark.slow

SKIP_MARK = "<!-- not run in CI"
TRAIN = ("--max_seq_len 96 --max_gen_len 32 --per_device_train_batch_size 4 --per_device_eval_batch_size 8 "
         "--gradient_accumulation_steps 1 --num_train_epochs 1 --max_iter_step 2 --num_save_checkpoint 1 "
         "--zero_stage 0 --learning_rate 1e-4")
SAMPLE = "--max_new_tokens 12 --max_length 96 --batch_size 8"
SCORE = "--max_seq_len 96 --max_gen_len 32 --batch_size 8"


def readme_script(recipe):
    """The README's bash blocks, in order, minus those marked as not run in CI."""
    text = (REPO_ROOT / "exp" / f"{recipe}_exp" / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"(?P<before>[^\n]*)\n```bash\n(?P<body>.*?)```", text, re.S):
        if SKIP_MARK not in match["before"]:
            blocks.append(match["body"])
    assert blocks, f"no bash blocks in the {recipe} README"
    return "set -euo pipefail\n" + "\n".join(blocks)


def run_readme(recipe, tmp_path, env):
    script = tmp_path / f"{recipe}_readme.sh"
    script.write_text(readme_script(recipe))
    cache = f"--data_output_path {tmp_path / 'cache'}"
    env = {"OUTPUT_ROOT": str(tmp_path / "models"), "TB_ROOT": str(tmp_path / "tb"), "DEVICES": "0",
           "DATA": str(tmp_path / "data"), "FIGURES": str(tmp_path / "figures"),
           "TRAIN": f"{TRAIN} {cache}", "SAMPLE": SAMPLE, "SCORE": SCORE, **env}
    result = run(["bash", str(script)], env=env, timeout=900)
    assert result.returncode == 0, f"{recipe} README failed\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def load(path):
    with open(path) as f:
        return json.load(f)


def check_winrate(ckpt, num_pairs):
    """The README's last step judged every sample against the reference, in both orders, and
    wrote the run's table."""
    result = load(ckpt / "winrate_rm.json")
    assert result["num_pairs"] == num_pairs and result["failed"] == 0 and 0 <= result["win_rate"] <= 1
    assert result["position_consistency"] == 1.0  # a reward model sees no order
    assert result["markdown_row"] in (ckpt.parent / "winrate_rm.md").read_text()


def test_imdb_readme(tmp_path, tiny_model):
    raw = recipe_fixtures.write_aclimdb(str(tmp_path / "raw"))
    result = run_readme("imdb", tmp_path, {"GPT2": tiny_model, "ACLIMDB": raw, "LOSSES": "exo-rw dpo-pref"})
    data, models = tmp_path / "data", tmp_path / "models" / "gpt2-large_imdb"
    assert "skipped 1: imdb_prefix10: review of at most 10 tokens" in result.stdout
    pref = load(data / "imdb_prefix10_pref" / "train.json")
    gen = load(data / "imdb_prefix10_sft" / "train.json")
    assert pref and all(r["chosen"] in g["completions"] and r["rejected"] in g["completions"]
                        for r, g in zip(pref, gen) if r["prompt"] == g["prompt"])
    for loss in ("exo-rw", "dpo-pref"):
        ckpt = data / "imdb_prefix10_infer_res" / "gpt2-large_imdb" / f"align_{loss}_nc2" / "ckpt1"
        assert (models / f"align_{loss}_nc2" / "ckpt1").is_dir()
        assert load(ckpt / "test_oracle_eval.json")["n"] == 4 * 16  # 16 test prompts x 4 samples
        assert isinstance(load(ckpt / "kl.json")["kl"], float)
    points = load(tmp_path / "figures" / "imdb_frontier.json")
    assert sorted(points) == ["align_dpo-pref_nc2", "align_exo-rw_nc2"]
    assert (tmp_path / "figures" / "imdb_frontier.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_pythia(tmp_path_factory):
    """A tiny GPT-NeoX (Pythia's architecture) with a tokenizer trained on the fixtures' words."""
    from utils.tiny_model import make_tiny_model

    texts = [" ".join(recipe_fixtures.NEUTRAL + recipe_fixtures.POSITIVE + recipe_fixtures.NEGATIVE)] * 4
    texts += ["SUBREDDIT: r/tifu\nTITLE: x\nPOST: y\nTL;DR:", "\n\nHuman: hi\n\nAssistant: hello"] * 4
    return make_tiny_model(str(tmp_path_factory.mktemp("pythia") / "neox"), texts, arch="gpt_neox", seed=0)


def test_tldr_readme(tmp_path, tiny_pythia):
    comparisons, filtered = recipe_fixtures.write_tldr(str(tmp_path / "raw"))
    result = run_readme("tldr", tmp_path, {"PYTHIA": tiny_pythia, "COMPARISONS": comparisons,
                                           "FILTERED": filtered, "LOSSES": "dpo-rw"})
    assert "skipped 1: no reddit post (a news article comparison)" in result.stdout
    results = tmp_path / "data" / "tldr_infer_res" / "pythia-2.8b_tldr" / "align_dpo-rw_nc2" / "ckpt1"
    assert len(load(results / "test.json")) == 6  # every kept test prompt (fewer than 512)
    assert load(results / "test_reward_eval.json")["n"] == 6 * 4
    check_winrate(results, 6 * 4)


def test_hh_readme(tmp_path, tiny_pythia):
    raw = recipe_fixtures.write_hh(str(tmp_path / "raw"))
    result = run_readme("hh", tmp_path, {"PYTHIA": tiny_pythia, "HH_RAW": raw, "LOSSES": "exo-pref"})
    assert "skipped 1: chosen and rejected differ before the last turn" in result.stdout
    results = tmp_path / "data" / "hh_infer_res" / "pythia-2.8b_hh" / "align_exo-pref_nc2" / "ckpt1"
    assert load(results / "test_reward_eval.json")["n"] == 6 * 4
    check_winrate(results, 6 * 4)
