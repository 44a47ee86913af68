"""The quickstart (exp/quickstart/run.sh), shortened through its size flags: every stage runs
through its launcher or entry point, the table and the plot appear, and a rerun skips every
stage that is already done."""
import json
import math

import pytest
from helpers import run

SMALL = ["--num_reviews", "200", "--num_train_prompts", "64", "--num_test_prompts", "16", "--sft_epochs", "1",
         "--rm_epochs", "1", "--align_steps", "3", "--num_checkpoints", "2", "--eval_samples", "2",
         "--methods", "exo-rw", "dpo-pref", "--online_rounds", "0"]
ENV = {"DEVICE_IDS": "0"}  # one CPU rank: the suite's budget is start-up bound


def quickstart(*args, timeout=600):
    return run(["bash", "exp/quickstart/run.sh", *args], env=ENV, timeout=timeout)


@pytest.mark.slow
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
    assert stale.returncode == 1 and "the page has\n  | stale |" in stale.stderr, stale.stderr[-2000:]
    wrote = run([*tables, "--write", str(readme)], timeout=60)
    assert wrote.returncode == 0 and exo in readme.read_text() and readme.read_text().endswith("end\n")
    assert run([*tables, "--check", str(readme)], timeout=60).returncode == 0

    again = quickstart("--workdir", str(workdir), *SMALL, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("done before, skipped") == 13  # every stage but the report
    assert table in again.stdout

    # The frontier driver's --quick grid on the same miniature, on one of its two seeds and with one
    # online round: its shared stages are the quickstart's, made above, so only its own cells run.
    # Seed 1's cells are seed 0's code again (~70 s), and so is a second round (~60 s; rounds that
    # continue one another: test_online.py); test_frontier.py checks the --quick graph's per-seed
    # wiring, the bootstrap's pairing over seeds and each round's pairing on synthetic sweeps.
    frontier_cmd = ["bash", "exp/frontier/run.sh", "--quick", "--seeds", "0", "--online_rounds", "1", "--workdir",
                    str(workdir)]
    frontier = run(frontier_cmd, env=ENV, timeout=900)
    assert frontier.returncode == 0, frontier.stdout[-4000:] + frontier.stderr[-4000:]
    for stage in ("corpus", "base_model", "sft", "sample", "oracle_pref", "rm", "rm_label", "pref_to_rw"):
        assert f"] {stage}: " in frontier.stdout and f"{stage}: " in [
            line.split("] ", 1)[-1][:len(stage) + 2] for line in frontier.stdout.splitlines()
            if "done before, skipped" in line], stage
    result = json.loads((workdir / "results.json").read_text())
    assert result["command"] == f"bash exp/frontier/run.sh --quick --seeds 0 --online_rounds 1 --workdir {workdir}"
    points = result["points"]
    offline = [p for p in points if p["kind"] == "offline"]
    assert {(p["method"], p["beta_pi"], p["seed"], p["checkpoint"]) for p in offline} == {
        (m, 1.0, 0, c) for m in ("exo-rw", "dpo-rw") for c in ("ckpt1", "ckpt2")}
    assert [(p["method"], p["seed"]) for p in points if p["kind"] == "sft"] == [("sft", 0)]
    for p in points:
        assert {"reward", "reward_se", "kl", "kl_se"} <= set(p) and -1 <= p["reward"] <= 1 and p["n"] == 16 * 4
    assert all(p["kl"] > 0 for p in offline)
    online = [p for p in points if p["kind"] == "online"]
    assert [(p["checkpoint"], p["steps"]) for p in online] == [("round1", 4)]
    # the round beside the offline checkpoint of its step; exo-rw's frontier against dpo-rw's
    assert [(r["steps"], r["pairs"]) for r in result["online"]] == [(4, 1)]
    exo = next(r for r in result["matched"] if r["method"] == "exo-rw")
    assert exo["baseline"] == "dpo-rw" and exo["kl"][-1] == pytest.approx(result["k_common"])
    assert all(low <= high for low, high in exo["diff_ci"])
    report = (workdir / "results.md").read_text()
    assert "| − dpo-rw |" in report and "In words" in report and report.split("\n\n", 2)[1] in frontier.stdout
    assert (workdir / "frontier.png").read_bytes()[:4] == b"\x89PNG"

    # the README section: --check fails on a stale one, --write makes it this sweep's
    (tmp_path / "imgs").mkdir()
    readme.write_text("a\n<!-- frontier results -->\nstale\n<!-- /frontier results -->\nb\n")
    analysis = ["python", "exp/frontier/analysis.py", "--workdir", str(workdir)]
    assert run([*analysis, "--check", str(readme)], timeout=120).returncode == 1
    assert run([*analysis, "--write", str(readme)], timeout=120).returncode == 0
    assert run([*analysis, "--check", str(readme)], timeout=120).returncode == 0
    assert "| − dpo-rw |" in readme.read_text() and (tmp_path / "imgs" / "frontier.png").exists()

    again = run(frontier_cmd, env=ENV, timeout=300)
    assert again.returncode == 0 and "(not done yet)" not in again.stdout and "redone" not in again.stdout

    # A recipe's models by flags (here the miniature's, with its reward model as the oracle): one cell
    models, data = workdir / "models" / "tiny_review", workdir / "data"
    recipe = run(["bash", "exp/frontier/run.sh", "--workdir", str(tmp_path / "recipe"), "--sft_model",
                  str(models / "sft"), "--reward_model", str(models / "rm"), "--oracle", f"rm:{models / 'rm'}",
                  "--prompts", f"review/sft:{data / 'prompts'}", "--rw_data", str(data / "prompts_rw"),
                  "--pref_data", str(data / "prompts_pref_p2r"), "--methods", "exo-rw", "--betas", "1", "--seeds", "0",
                  "--align_steps", "2", "--num_checkpoints", "1", "--align_lr", "1e-3", "--eval_samples", "2",
                  "--bootstrap", "50", "--train_args", "--max_seq_len 104 --max_gen_len 72 --zero_stage 0 "
                  "--no-gradient_checkpointing --per_device_train_batch_size 8 --gradient_accumulation_steps 1"],
                 env=ENV, timeout=600)
    assert recipe.returncode == 0, recipe.stdout[-4000:] + recipe.stderr[-4000:]
    point = json.loads((tmp_path / "recipe" / "results.json").read_text())["points"][-1]
    assert point["method"] == "exo-rw" and point["kl"] > 0 and point["n"] == 16 * 2
    rm_scored = json.loads((tmp_path / "recipe" / "eval" / "exo-rw_b1_s0" / "ckpt1" / "oracle" / "test.json").read_text())
    assert len(rm_scored) == 16 and all(len(r["rewards"]) == 2 for r in rm_scored)


@pytest.mark.slow
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

    from helpers import REPO_ROOT

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

