"""The quickstart (exp/quickstart/run.sh), shortened through its size flags: every stage runs
through its launcher or entry point, the table and the plot appear, and a rerun skips every
stage that is already done."""
import json
import math

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
