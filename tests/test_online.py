"""Online EXO (exp/online_exp/run.sh): two rounds on a tiny model and 2 CPU ranks. Round 2
samples from round 1's policy, the results have one row per round, and a run SIGKILLed (its
whole process group) during round 2's alignment, then rerun, ends with the same final weights,
bit for bit, as an uninterrupted round 2."""
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import POSITIVE, NEGATIVE, REPO_ROOT, SRC, WORDS, run, write_split

ENV = {"DEVICE_IDS": "0,1"}


@pytest.fixture(scope="module")
def online_inputs(tiny_model, tmp_path_factory):
    """(prompts dir of sft records, an untrained one-label reward model on the tiny backbone)."""
    from utils.model_utils import load_reward_model, load_tokenizer

    root = tmp_path_factory.mktemp("online")
    rng = random.Random(0)
    vocabulary = WORDS + POSITIVE + NEGATIVE
    prompts = root / "prompts"
    for split, n in (("train", 16), ("test", 4)):
        write_split(prompts, split, [{"prompt": " ".join(rng.choice(vocabulary) for _ in range(3)),
                                      "chosen": " ".join(rng.choice(vocabulary) for _ in range(4))} for _ in range(n)])
    reward_model = str(root / "rm")
    tokenizer = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    load_reward_model(tiny_model, tokenizer).save_pretrained(reward_model)
    tokenizer.save_pretrained(reward_model)
    return str(prompts), reward_model


def online_command(tiny_model, online_inputs, out, *extra):
    prompts, reward_model = online_inputs
    # 16 prompts x K = 2 on 2 ranks of 2 groups: 4 steps a pass; 3 passes give round 2's kill a window
    return ["bash", "exp/online_exp/run.sh", "--sft_model", tiny_model, "--reward_model", reward_model,
            "--data_name_path", f"toy/sft:{prompts}", "--output_dir", str(out), "--rounds", "2", "--num_samples", "2",
            "--max_new_tokens", "6", "--max_length", "16", "--num_train_epochs", "3", "--max_iter_step", "12",
            "--num_save_checkpoint", "4", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--zero_stage", "0",
            "--no-gradient_checkpointing", "--eval_batch_size", "8", *extra]


def kill_during_round2_alignment(cmd, out, timeout=900):
    """Start `cmd`; SIGKILL its process group once round 2's alignment has written a resumable
    checkpoint and before it is done."""
    policy = out / "round2" / "policy_online" / "align_exo-rw_nc2"
    env = {**os.environ, "PYTHONPATH": str(SRC), **ENV}
    out.mkdir(parents=True)
    with open(out.parent / "killed_run.log", "w+") as log, \
            subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True) as process:
        deadline = time.monotonic() + timeout
        while not (policy / "ds_checkpoints" / "latest").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                log.seek(0)
                pytest.fail(f"round 2's alignment never checkpointed:\n{log.read()[-4000:]}")
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
    assert not (out / "stages" / "round2_align.json").exists(), "killed too late: round 2's alignment had finished"


def final_weights(out):
    return load_file(out / "round2" / "policy_online" / "align_exo-rw_nc2" / "model.safetensors")


@pytest.mark.slow
def test_two_online_rounds_resume_bit_exactly_after_a_kill(tiny_model, online_inputs, tmp_path):
    out = tmp_path / "online"
    cmd = online_command(tiny_model, online_inputs, out)
    kill_during_round2_alignment(cmd, out)

    rerun = run(cmd, env=ENV, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]
    for name in ("round0_eval", "round1_sample", "round1_score", "round1_align", "round1_eval", "round2_sample",
                 "round2_score"):
        line = next(line for line in rerun.stdout.splitlines() if f"] {name}: " in line)
        assert line.endswith("done before, skipped"), line
    assert "round2_align: exo-rw from round 1 policy (interrupted before, resuming)" in rerun.stdout
    assert "resumed from" in (out / "logs" / "round2_align.log").read_text()

    # round 2 sampled from round 1's policy, round 1 from the SFT model
    manifests = [json.loads((out / f"round{r}" / "manifest.json").read_text()) for r in (1, 2)]
    assert manifests[0]["source_model"] == tiny_model
    assert manifests[1]["source_model"] == manifests[0]["policy"] != tiny_model
    assert manifests[0]["reference"] == manifests[1]["reference"] == tiny_model
    for manifest in manifests:  # the gen records' own source_model, where the sampler writes one
        for record in json.loads((out / f"round{manifest['round']}" / "samples" / "train.json").read_text()):
            assert record.get("source_model", manifest["source_model"]) == manifest["source_model"]
            assert len(record["completions"]) == 2

    results = json.loads((out / "results.json").read_text())
    assert [row["round"] for row in results["rows"]] == [1, 2]
    assert [row["sampled_from"] for row in results["rows"]] == [tiny_model, manifests[0]["policy"]]
    assert [row["total_steps"] for row in results["rows"]] == [12, 24]
    assert results["sft"]["kl"] == 0 and all(row["n"] == 4 * 2 for row in results["rows"])
    table = (out / "results.md").read_text()
    assert table.count("\n| 1 | SFT | 12 (12) |") == 1 and table.count("\n| 2 | round 1 | 12 (24) |") == 1
    assert (out / "reward_kl_per_round.png").read_bytes()[:4] == b"\x89PNG"
    resumed = final_weights(out)

    # the same round 2 uninterrupted, from scratch: the same weights, bit for bit, and the same results
    again = run([*cmd, "--force", "round2_align"], env=ENV, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "starting from scratch" in (out / "logs" / "round2_align.log").read_text().split("\n$ ")[-1]
    uninterrupted = final_weights(out)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)
    assert any(not torch.equal(resumed[name], load_file(os.path.join(tiny_model, "model.safetensors"))[name])
               for name in resumed)  # round 2 did train
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]


PROMPTS_MODULE = """
import os
from utils.data.raw_datasets import PromptRawDataset, register_dataset

@register_dataset("toy_lines")
class ToyLines(PromptRawDataset):
    \"\"\"One prompt per line of SPLIT.txt.\"\"\"
    kind = "sft"

    def source(self, split):
        return os.path.join(self.path, split + ".txt")

    def load_split(self, split):
        with open(self.source(split), encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]

    def get_prompt(self, sample):
        return sample

    def get_chosen(self, sample):
        return " the end"
"""


@pytest.mark.slow
def test_online_reads_prompts_through_a_dataset_module(tiny_model, online_inputs, tmp_path):
    """Prompts in a format of the user's own (--dataset_module, a path relative to where the
    driver starts) reach sampling and the evaluations: one round runs, on the file's prompts. The
    round aligns with the reference-free simpo, so online rounds run a loss without a reference too."""
    prompts_dir, reward_model = tmp_path / "lines", online_inputs[1]
    prompts_dir.mkdir()
    for split, n in (("train", 8), ("test", 2)):
        (prompts_dir / f"{split}.txt").write_text("".join(f"the movie {i} was\n" for i in range(n)))
    (tmp_path / "my_prompts.py").write_text(PROMPTS_MODULE)
    out = tmp_path / "out"
    result = run(["bash", str(REPO_ROOT / "exp/online_exp/run.sh"), "--sft_model", tiny_model,
                  "--reward_model", reward_model, "--dataset_module", "my_prompts.py",
                  "--data_name_path", f"toy_lines:{prompts_dir}", "--output_dir", str(out), "--rounds", "1",
                  "--num_samples", "2", "--max_new_tokens", "4", "--max_length", "12", "--max_iter_step", "2",
                  "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
                  "--gradient_accumulation_steps", "1", "--zero_stage", "0", "--no-gradient_checkpointing",
                  "--eval_batch_size", "8", "--loss_type", "simpo"], timeout=900, env={"DEVICE_IDS": "0"}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = json.loads((out / "round1" / "samples" / "train.json").read_text())
    assert [s["prompt"] for s in samples] == [f"the movie {i} was" for i in range(8)]
    evaluated = json.loads((out / "eval" / "round1" / "test.json").read_text())
    assert [s["prompt"] for s in evaluated] == ["the movie 0 was", "the movie 1 was"]
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 1
    assert (out / "round1" / "policy_online" / "align_simpo_nc2" / "model.safetensors").exists()


@pytest.mark.slow
def test_online_bad_flags_are_one_line(tiny_model, online_inputs, tmp_path):
    prompts, reward_model = online_inputs
    base = ["bash", "exp/online_exp/run.sh", "--sft_model", tiny_model, "--reward_model", reward_model,
            "--data_name_path", f"toy/sft:{prompts}", "--output_dir", str(tmp_path / "out")]
    for extra, message in ((["--eval_samples", "3"], "error: --eval_samples 3 must be a multiple of --num_samples 4"),
                           (["--force", "round9_align"], "error: --force round9_align: no such stage")):
        result = run([*base, *extra], timeout=300)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not (tmp_path / "out" / "stages").exists()


# -- the stage runner both drivers share (src/utils/pipeline.py) -------------------------------
def test_stage_runner_resumes_same_settings_and_never_leaves_stale_dependents(tmp_path):
    from utils.pipeline import Pipeline

    runs = []

    def build(settings, fail_in=None):
        pipe = Pipeline(tmp_path, None)
        for name, deps in (("a", []), ("b", ["a"]), ("c", ["b"])):
            out = tmp_path / f"{name}.out"

            def work(log, name=name, out=out):
                runs.append((name, out.exists()))  # whether a partial output was kept for it
                out.write_text(name)
                if name == fail_in:
                    raise RuntimeError("killed")
            pipe.stage(name, name, deps, settings.get(name, {}), [out], work)
        return pipe

    build({}).run()
    assert runs == [("a", False), ("b", False), ("c", False)]
    runs.clear()
    build({}).run()
    assert runs == []  # all done

    # a redone `a` whose run dies in `b`: `c` (never reached) must not look done, nor keep its output
    runs.clear()
    with pytest.raises(RuntimeError):
        build({"a": {"v": 2}}, fail_in="b").run()
    assert runs == [("a", False), ("b", False)] and not (tmp_path / "c.out").exists()
    runs.clear()
    build({"a": {"v": 2}}).run()
    assert runs == [("b", True), ("c", False)]  # b resumes from its partial output, c runs

    # a stage killed under other settings than the rerun's starts clean
    runs.clear()
    with pytest.raises(RuntimeError):
        build({"a": {"v": 2}, "c": {"x": 1}}, fail_in="c").run()
    runs.clear()
    build({"a": {"v": 2}, "c": {"x": 2}}).run()
    assert runs == [("c", False)]


def test_stage_runner_checks_what_a_stage_was_made_from_whatever_earlier_runs_did(tmp_path, capsys):
    """The online sequence --rounds 3, --rounds 2 with a changed flag, --rounds 3 in small: the
    stage past the shorter run is redone from its input as it is now; a damaged record is a
    stage not done (one line), and so is a stage whose output changed on disk."""
    from utils.pipeline import Pipeline

    runs = []
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights").write_text("v1")

    def build(rounds, lr):
        pipe = Pipeline(tmp_path, None)
        for r in range(1, rounds + 1):
            out = tmp_path / f"round{r}"

            def work(log, r=r, out=out):
                runs.append(r)
                before = (tmp_path / f"round{r - 1}" / "policy").read_text() if r > 1 else "sft"
                out.mkdir(exist_ok=True)
                (out / "policy").write_text(f"lr {lr} after {before}")
            pipe.stage(f"round{r}", "", [f"round{r - 1}"] if r > 1 else [], {"lr": lr}, [out], work,
                       inputs=[source] if r == 1 else [])
        return pipe

    build(3, 1).run()
    build(2, 2).run()
    assert runs == [1, 2, 3, 1, 2]
    runs.clear()
    build(3, 2).run()
    assert runs == [3], "round 3 was made from the old round 2"
    assert (tmp_path / "round3" / "policy").read_text() == "lr 2 after lr 2 after lr 2 after sft"

    runs.clear()
    (source / "weights").write_text("v2")  # the input model retrained in place
    capsys.readouterr()
    build(3, 2).run()
    assert runs == [1, 2, 3] and f"(inputs[{source}] changed)" in capsys.readouterr().out

    runs.clear()
    marker = tmp_path / "stages" / "round2.json"
    marker.write_text(marker.read_text()[:20])  # a crash while the record was written
    build(3, 2).run()
    out = capsys.readouterr().out
    assert runs == [2, 3] and "round2.json: unreadable record" in out, out

    runs.clear()
    (tmp_path / "round3" / "policy").write_text("damaged")
    build(3, 2).run()
    assert runs == [3] and "changed since it was written" in capsys.readouterr().out


@pytest.mark.slow
def test_stage_runner_kills_a_group_left_by_a_killed_driver(tmp_path):
    from utils.fileio import InputError
    from utils.pipeline import _start_time, kill_stale_group

    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pgid_file = tmp_path / "stage.pgid"
    pgid_file.write_text(json.dumps({"pgid": orphan.pid, "start": _start_time(orphan.pid)}))
    reaper = threading.Thread(target=orphan.wait)  # as init reaps a real orphan: no zombie keeps the group
    reaper.start()
    assert kill_stale_group(pgid_file)
    reaper.join(timeout=10)
    assert orphan.returncode == -signal.SIGKILL and not pgid_file.exists()
    # a recorded pid that now names another process is left alone
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    pgid_file.write_text(json.dumps({"pgid": other.pid, "start": "not its start time"}))
    assert not kill_stale_group(pgid_file)
    assert other.poll() is None
    # ... and so is one whose driver still runs: a second run in the same directory stops instead
    pgid_file.write_text(json.dumps({"pgid": other.pid, "start": _start_time(other.pid), "driver": other.pid,
                                     "driver_start": _start_time(other.pid)}))
    with pytest.raises(InputError, match="another run"):
        kill_stale_group(pgid_file)
    assert other.poll() is None
    other.kill()
    other.wait()
