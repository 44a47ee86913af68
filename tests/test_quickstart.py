"""The quickstart (exp/quickstart/run.sh), shortened through its size flags: every stage runs
through its launcher or entry point, the table and the plot appear, and a rerun skips every
stage that is already done."""
import json
import math

import pytest
from conftest import run

SMALL = ["--num_reviews", "200", "--num_train_prompts", "64", "--num_test_prompts", "16", "--sft_epochs", "1",
         "--rm_epochs", "1", "--align_steps", "3", "--num_checkpoints", "2", "--eval_samples", "2",
         "--methods", "exo-rw", "dpo-pref", "--online_rounds", "0"]
ENV = {"DEVICE_IDS": "0"}  # one CPU rank: the suite's budget is start-up bound


def quickstart(*args, timeout=600):
    return run(["bash", "exp/quickstart/run.sh", *args], env=ENV, timeout=timeout)


def test_quickstart_writes_the_table_and_skips_done_stages(tmp_path):
    workdir = tmp_path / "quickstart"
    first = quickstart("--workdir", str(workdir), *SMALL)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    rows = json.loads((workdir / "results.json").read_text())["rows"]
    assert [(r["method"], r["checkpoint"]) for r in rows] == [
        ("sft", "sft"), ("exo-rw", "ckpt1"), ("exo-rw", "ckpt2"), ("dpo-pref", "ckpt1"), ("dpo-pref", "ckpt2")]
    for row in rows:
        assert -1 <= row["reward"] <= 1 and math.isfinite(row["kl"]) and row["n"] == 16 * 2, row
    assert rows[0]["kl"] == 0
    table = (workdir / "results.md").read_text()
    assert "| method | checkpoint | oracle reward | KL(pi ‖ pi_sft) | win rate vs SFT (oracle) |" in table
    assert f"| exo-rw | ckpt2 | {rows[2]['reward']:.3f}" in table
    # every aligned checkpoint judged against the SFT samples, both orders, no judgment failed
    assert "win_rate" not in rows[0] and all(0 <= r["win_rate"] <= 1 for r in rows[1:])
    winrate = json.loads((workdir / "eval" / "exo-rw" / "ckpt2" / "winrate.json").read_text())
    assert winrate["num_pairs"] == 16 * 2 and winrate["failed"] == 0 and winrate["position_consistency"] == 1
    assert f"{rows[2]['win_rate']:.3f} [" in table
    assert table in first.stdout  # printed at the end
    assert (workdir / "reward_vs_kl.png").read_bytes()[:4] == b"\x89PNG"
    # the stages wrote where the launchers put them
    assert (workdir / "models" / "tiny_review" / "align_exo-rw_nc4" / "ckpt2" / "config.json").exists()
    assert (workdir / "models" / "tiny_review" / "align_dpo-pref_nc2" / "ckpt2" / "config.json").exists()
    assert len(json.loads((workdir / "data" / "prompts_rw" / "train.json").read_text())) == 64

    # the README's table format, and the check that the README holds this run's numbers
    tables = ["python", "exp/quickstart/readme_tables.py", "--workdir", str(workdir)]
    printed = run(tables, timeout=60)
    assert printed.returncode == 0, printed.stderr[-2000:]
    exo = (f"| exo-rw | ckpt1 / 2 | {rows[1]['reward']:.3f} / {rows[2]['reward']:.3f} | "
           f"{rows[1]['kl']:.2f} / {rows[2]['kl']:.2f} | {rows[1]['win_rate']:.3f} / {rows[2]['win_rate']:.3f} |")
    assert exo in printed.stdout.splitlines(), printed.stdout
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- quickstart table: offline -->\n| stale |\n<!-- /quickstart table -->\nend\n")
    stale = run([*tables, "--check", str(readme)], timeout=60)
    assert stale.returncode == 1 and "the README has\n  | stale |" in stale.stderr, stale.stderr[-2000:]
    wrote = run([*tables, "--write", str(readme)], timeout=60)
    assert wrote.returncode == 0 and exo in readme.read_text() and readme.read_text().endswith("end\n")
    assert run([*tables, "--check", str(readme)], timeout=60).returncode == 0

    again = quickstart("--workdir", str(workdir), *SMALL, timeout=120)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("done before, skipped") == 13  # every stage but the report
    assert table in again.stdout


def test_quickstart_bad_flag_is_one_line(tmp_path):
    result = quickstart("--workdir", str(tmp_path), "--force", "no_such_stage", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --force no_such_stage: no such stage")
    assert not (tmp_path / "stages").exists()


@pytest.fixture
def in_process_stage():
    """Room for a stage's main() run inside the test process: the one-process group it joins
    sets RANK, MASTER_PORT, ... in os.environ and listens on that port, and every later
    subprocess of the suite would inherit them and find the port taken. Both go afterwards."""
    import os

    import torch.distributed

    saved = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def test_evaluate_keeps_an_output_only_when_made_from_the_same_inputs(tiny_model, align_data, tmp_path, capsys,
                                                                       in_process_stage):
    """evaluate.py's steps reuse an output only when its record says it was made from what the
    rerun would make it from: a changed judge redoes the win rate alone, a changed model what it
    makes, a changed seed the samples and all that reads them, and an output without a record
    (an older run's) is redone."""
    import importlib.util
    import shutil

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("quickstart_evaluate", REPO_ROOT / "exp" / "quickstart" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    policy, out = tmp_path / "policy", tmp_path / "eval"
    shutil.copytree(tiny_model, policy)
    judge = tmp_path / "judge.py"
    judge.write_text("def longer(prompt, completions):\n    return [float(len(c)) for c in completions]\n")
    argv = ["--prompts", f"toy/rw:{align_data['rw']}", "--sft_model", tiny_model, "--model", f"sft={tiny_model}",
            "--model", f"pol={policy}", "--output_dir", str(out), "--return_num", "2", "--max_new_tokens", "6",
            "--max_length", "48", "--batch_size", "16", "--winrate_baseline", str(out / "sft")]

    def run_evaluate(*extra):
        evaluate.main(argv + list(extra))
        printed = capsys.readouterr().out
        return {name: f"pol: {name} made from the same inputs before, kept" in printed.replace(f"{out}/", "")
                for name in ("samples", "logps_policy", "logps_sft", "kl", "winrate")}, printed

    run_evaluate()
    first = json.loads((out / "pol" / "winrate.json").read_text())
    assert first["num_prompts"] == 16 and first["judge"].endswith("oracle_rewards")
    kept, _ = run_evaluate()
    assert all(kept.values()), kept
    kept, printed = run_evaluate("--winrate_judge", f"fn:{judge}:longer")
    assert kept == {"samples": True, "logps_policy": True, "logps_sft": True, "kl": True, "winrate": False}
    assert "winrate redone (judge changed)" in printed
    assert json.loads((out / "pol" / "winrate.json").read_text())["judge"] == f"fn:{judge}:longer"
    # the model's files changed: what it makes is redone; the same samples came out, so what reads them stays
    (policy / "note.txt").write_text("retrained in place\n")
    kept, printed = run_evaluate("--winrate_judge", f"fn:{judge}:longer")
    assert kept == {"samples": False, "logps_policy": False, "logps_sft": True, "kl": True, "winrate": True}
    assert "samples redone (model changed)" in printed
    kept, printed = run_evaluate("--winrate_judge", f"fn:{judge}:longer", "--seed", "43")
    assert not any(kept.values()) and "samples redone (seed changed)" in printed, printed
    shutil.rmtree(out / "pol" / "stages")  # as an evaluate.py before records left it
    kept, _ = run_evaluate("--winrate_judge", f"fn:{judge}:longer", "--seed", "43")
    assert not any(kept.values())
