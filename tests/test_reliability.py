"""Runs survive being killed: exact resume after SIGKILL (also in the middle of a checkpoint
write), SIGTERM as a clean preemption, atomic output files, and skipped non-finite steps.

Exactness is checked where it can be: 2 CPU ranks under ZeRO-2 in fp32, where a resumed run
must end with the same weights (|diff| <= 1e-6) and log the same per-step losses as a run
that was never interrupted.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, SRC, finish, launcher, run, start, train_losses
from safetensors.torch import load_file

COMMON = ["--max_seq_len", "48", "--max_gen_len", "16", "--per_device_train_batch_size", "4",
          "--per_device_eval_batch_size", "16", "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine",
          "--seed", "7", "--zero_stage", "2", "--print_loss", "--save_step_interval", "1", "--keep_last_n", "2"]
STAGES = {
    # 64 records x 2 groups of K=2 per record / (4 x 2 ranks) = 16 steps an epoch
    "exo": ("train_exo.py", "rw", ["--loss_type", "exo-rw", "--num_contrastive", "2", "--max_iter_step", "8"]),
    # SFT keeps the model's dropout: the resume must restore every rank's RNG to match.
    "sft": ("train_sft.py", "pref", ["--num_train_epochs", "2", "--max_iter_step", "10"]),
}


def command(stage, model, data, out, cache, *flags, ranks=2):
    script, kind, stage_flags = STAGES[stage]
    return [*launcher(ranks), f"src/{script}",
            "--model_name_or_path", model, "--data_name_path", f"toy/{kind}:{data[kind]}", "--output_dir", str(out),
            "--data_output_path", str(cache), *COMMON, *stage_flags, *flags]


def run_until(process, seen, act, timeout=300):
    """Read the output until `seen(line)` is true, then call `act()`; return the output so far."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if seen(line):
            act()
            break
        if time.monotonic() > deadline:
            break
    else:
        pytest.fail("the run ended before the awaited line:\n" + "".join(lines)[-3000:])
    return "".join(lines)


def max_weight_diff(dir_a, dir_b):
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumed_step(output):
    return int(re.search(r"resumed from .* at step (\d+)", output).group(1))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, align_data, tmp_path_factory):
    """{stage: (output dir, output)} of runs never interrupted, the reference for every resume."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for stage in STAGES:
        out = root / stage
        output = finish(start(command(stage, tiny_model, align_data, out, root / "cache")))
        assert "saved the final model" in output, output[-3000:]
        runs[stage] = (out, output)
    return runs


def assert_same_as_uninterrupted(reference, out, resumed_output):
    ref_dir, ref_output = reference
    start_step = resumed_step(resumed_output)
    after = train_losses(resumed_output)
    expected = {s: v for s, v in train_losses(ref_output).items() if s > start_step}
    assert after == expected and after, (start_step, after, expected)
    assert max_weight_diff(ref_dir, out) <= 1e-6
    for ckpt in [d for d in os.listdir(ref_dir) if d.startswith("ckpt") and int(d[4:]) > start_step]:
        assert max_weight_diff(os.path.join(ref_dir, ckpt), os.path.join(out, ckpt)) <= 1e-6


@pytest.mark.slow
def test_exo_killed_at_a_random_step_resumes_exactly(tiny_model, align_data, tmp_path, uninterrupted):
    """SIGKILL to launcher and ranks once a randomly chosen step is logged; --resume auto finishes
    the run with the weights and per-step losses of the uninterrupted one."""
    kill_after = random.Random(6).randint(2, 6)
    out, cache = tmp_path / "run", tmp_path / "cache"
    process = start(command("exo", tiny_model, align_data, out, cache))
    run_until(process, lambda line: f"[train step {kill_after}]" in line, lambda: os.killpg(process.pid, signal.SIGKILL))
    process.wait()
    resumed = finish(start(command("exo", tiny_model, align_data, out, cache, "--resume", "auto")))
    assert resumed_step(resumed) >= kill_after - 1, resumed[-2000:]  # a checkpoint is written at every step here
    assert_same_as_uninterrupted(uninterrupted["exo"], out, resumed)


@pytest.mark.slow
def test_sft_killed_while_writing_a_checkpoint_resumes_exactly(tiny_model, align_data, tmp_path, uninterrupted):
    """SIGKILL while a checkpoint is half written: `latest` still names a complete one, the half
    one is refused, and the resumed run matches the uninterrupted one (dropout RNG included)."""
    from utils.fileio import InputError
    from utils.checkpointing import checkpoint_location

    after_step = random.Random(7).randint(2, 6)
    out, cache = tmp_path / "run", tmp_path / "cache"
    ds_dir = out / "ds_checkpoints"
    process = start(command("sft", tiny_model, align_data, out, cache))
    run_until(process, lambda line: f"[train step {after_step}]" in line, lambda: None)

    def unfinished():
        return [d for d in os.listdir(ds_dir) if d.startswith(".")] if ds_dir.is_dir() else []

    deadline = time.monotonic() + 120
    while not unfinished() and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert unfinished(), "no checkpoint write was in progress"
    directory, tag = checkpoint_location(str(ds_dir))
    assert json.loads((ds_dir / tag / "run_state.json").read_text())["state"]["step"] >= after_step - 1
    with pytest.raises(InputError, match="unfinished checkpoint"):
        checkpoint_location(str(ds_dir / unfinished()[0]))

    resumed = finish(start(command("sft", tiny_model, align_data, out, cache, "--resume", "auto")))
    assert_same_as_uninterrupted(uninterrupted["sft"], out, resumed)
    assert sorted(d for d in os.listdir(ds_dir) if d.startswith("global_step")) == ["global_step10", "global_step9"]


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(tiny_model, align_data, tmp_path, uninterrupted):
    """SIGTERM to every rank mid-run (what a cluster scheduler sends): the ranks finish the step,
    agree to stop, checkpoint and exit 0, so the launcher does too; the resumed run is exact."""
    import psutil

    out, cache = tmp_path / "run", tmp_path / "cache"
    process = start(command("sft", tiny_model, align_data, out, cache))

    def terminate_ranks():
        for child in psutil.Process(process.pid).children(recursive=True):
            cmdline = " ".join(child.cmdline())
            if "train_sft.py" in cmdline and "deepspeed.launcher" not in cmdline:  # the ranks, not launch.py
                child.send_signal(signal.SIGTERM)

    output = run_until(process, lambda line: "[train step 3]" in line, terminate_ranks)
    output += finish(process)
    assert process.returncode == 0, output[-3000:]
    stopped = int(re.search(r"stopped by a signal after step (\d+); resumable checkpoint", output).group(1))
    assert stopped >= 3 and "saved the final model" not in output
    assert (out / "ds_checkpoints" / "latest").read_text() == f"global_step{stopped}"

    resumed = finish(start(command("sft", tiny_model, align_data, out, cache, "--resume", "auto")))
    assert resumed_step(resumed) == stopped
    assert_same_as_uninterrupted(uninterrupted["sft"], out, resumed)


@pytest.mark.slow
def test_diverging_run_skips_non_finite_steps_then_stops_with_a_checkpoint(tiny_model, align_data, tmp_path):
    """A learning rate of 1e30 makes the first update blow the weights up to ~1e30, so every
    later forward overflows fp32 and the loss is NaN: a real divergence, no injected fault.
    Those steps are skipped (weights unchanged, finite), counted and logged; after
    --max_nonfinite_steps in a row the run stops with exit code 1, one line, and a checkpoint.
    Plain `python` (no ZeRO): the case DeepSpeed itself would not skip."""
    out = tmp_path / "run"
    cmd = ["python", "src/train_exo.py", "--model_name_or_path", tiny_model, "--data_name_path",
           f"toy/rw:{align_data['rw']}", "--output_dir", str(out), "--data_output_path", str(tmp_path / "cache"),
           "--loss_type", "exo-rw", "--num_contrastive", "2", *COMMON[:12], "--print_loss", "--save_step_interval", "1",
           "--learning_rate", "1e30", "--max_nonfinite_steps", "3", "--max_iter_step", "10"]
    process = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 1, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in process.stderr
    assert re.search(r"3 optimizer steps in a row had a non-finite loss .* \(last at step 4\); resumable checkpoint",
                     errors[0]), errors
    assert [int(s) for s in re.findall(r"step (\d+): non-finite loss or gradient norm, update skipped",
                                       process.stdout)] == [2, 3, 4]
    assert re.search(r"\[train step 4\] loss=nan .*skipped_steps=3", process.stdout)
    assert (out / "ds_checkpoints" / "latest").read_text() == "global_step4"
    import torch

    first = load_file(out / "ckpt1" / "model.safetensors")
    assert max_weight_diff(out / "ckpt1", out / "ckpt4") == 0  # the skipped updates changed nothing
    assert all(torch.isfinite(t).all() for t in first.values())


@pytest.mark.slow
def test_atomic_writes_leave_the_old_or_the_new_file_when_killed(tmp_path):
    """A writer rewriting a 20 MB JSON file in a loop is SIGKILLed at 15 random moments; each
    time the file parses whole (one of the versions written) and only hidden temp files remain."""
    target = tmp_path / "out.json"
    writer = ("import sys; sys.path.insert(0, sys.argv[1]); from utils.fileio import atomic_write_json\n"
              "i = 0\n"
              "while True:\n"
              "    atomic_write_json(sys.argv[2], {'version': i, 'payload': 'x' * 20_000_000}, indent=None); i += 1\n")
    rng = random.Random(0)
    versions = []
    for _ in range(15):
        process = subprocess.Popen([sys.executable, "-c", writer, str(SRC), str(target)])
        time.sleep(0.3 + rng.random() * 0.7)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if target.exists():
            record = json.loads(target.read_text())
            assert len(record["payload"]) == 20_000_000
            versions.append(record["version"])
        assert all(name.startswith(".out.json.") for name in os.listdir(tmp_path) if name != "out.json")
    assert versions  # the file was written at least once


def test_a_prompt_longer_than_max_seq_len_is_cut_counted_and_reported(tiny_model, tmp_path, capsys):
    """Not an error and not dropped: the tokenisation rule cuts the prompt on the left, so every record
    still trains; how many were cut is reported once, when the split is tokenised."""
    from helpers import write_split
    from utils.data.encoders import SFTEncoder
    from utils.data.tokenisation import Tokenisation
    from utils.data.tokenised_datasets import build_dataset
    from utils.data.dataset_names import load_raw_datasets
    from utils.model_utils import load_tokenizer

    records = [{"prompt": "the movie was " * 40, "chosen": "good fun"}, {"prompt": "a film", "chosen": "bad"},
               {"prompt": "the plot and the acting " * 20, "chosen": "dull"}]
    write_split(tmp_path / "long", "train", records)
    write_split(tmp_path / "long", "test", records)
    tok = Tokenisation(load_tokenizer(tiny_model), 32, 8)
    dataset, _ = build_dataset(load_raw_datasets([f"long/sft:{tmp_path / 'long'}"]), "train", tok,
                               str(tmp_path / "cache"), {"stage": "sft"}, SFTEncoder)
    assert len(dataset) == 3 and max(len(ids) for ids in dataset["input_ids"]) == 32
    assert re.search(r"train\.json: 2 sequences of 3 records had their prompt cut on the left to fit --max_seq_len 32",
                     capsys.readouterr().out)


def test_pruning_keeps_the_last_n_up_to_the_step_just_written(tmp_path):
    """Checkpoints after the one just written belong to a run this one replaced: they go too."""
    from utils.checkpointing import prune_checkpoints

    for step in (1, 2, 3, 4, 5, 12):
        (tmp_path / f"global_step{step}").mkdir()
    (tmp_path / ".global_step6.tmp").mkdir()  # an unfinished save: the next save of step 6 replaces it
    prune_checkpoints(str(tmp_path), 2, 4)
    assert sorted(os.listdir(tmp_path)) == [".global_step6.tmp", "global_step3", "global_step4"]


@pytest.mark.slow
def test_last_step_export_evaluates_once_and_resume_refuses_another_learning_rate(tiny_model, align_data, tmp_path):
    """When the final step is also an export, the final evaluation is that export's: one eval point
    per step in the log and in TensorBoard. Resuming its checkpoint with another --learning_rate is
    refused before any work (the optimizer state would silently keep the old one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    flags = ["src/train_sft.py", "--model_name_or_path", tiny_model, "--data_name_path", f"toy/sft:{align_data['pref']}",
             "--output_dir", str(out), "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "48",
             "--max_gen_len", "16", "--max_iter_step", "2", "--num_save_checkpoint", "1", "--learning_rate", "1e-4"]
    result = run(["python", *flags, "--enable_tensorboard"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.findall(r"\[eval step (\d+)\]", result.stdout) == ["0", "2"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2]

    refused = run(["python", *flags, "--learning_rate", "2e-4", "--resume", str(out / "ds_checkpoints")], timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert re.search(r"written with --learning_rate 0\.0001, this run has --learning_rate 0\.0002", lines[0])


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumed(tiny_model, align_data, tmp_path):
    """Checkpoints record their files' digests: `--resume auto` on a cut-short newest checkpoint
    says so in one line and resumes from the one before; `--resume PATH` on it is one error
    line; a damaged export is one error line for the stage that loads it."""
    from utils.fileio import InputError
    from utils.model_utils import load_causal_lm, load_tokenizer

    out = tmp_path / "out"
    flags = ["src/train_sft.py", "--model_name_or_path", tiny_model, "--data_name_path", f"toy/sft:{align_data['pref']}",
             "--output_dir", str(out), "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "48",
             "--max_gen_len", "16", "--max_iter_step", "8", "--num_train_epochs", "100",
             "--per_device_train_batch_size", "2", "--num_save_checkpoint", "4", "--keep_last_n", "2"]
    first = run(["python", *flags], timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    root = out / "ds_checkpoints"
    assert sorted(p.name for p in root.glob("global_step*")) == ["global_step6", "global_step8"]
    states = root / "global_step8" / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as f:
        f.truncate(size // 2)

    resumed = run(["python", *flags, "--resume", "auto"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"--resume auto: {re.escape(str(states))} is damaged \({size // 2} bytes, written with {size}\); "
                     r"not resuming from global_step8", resumed.stdout), resumed.stdout[-2000:]
    assert f"resumed from {root / 'global_step6'} at step 6" in resumed.stdout

    with open(states, "r+b") as f:  # the step-8 checkpoint the resumed run wrote, damaged again
        f.truncate(size // 2)
    refused = run(["python", *flags, "--resume", str(root / "global_step8")], timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and "is damaged" in lines[0], refused.stderr[-2000:]

    weights = out / "ckpt1" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(InputError, match=r"model .*ckpt1: .*model\.safetensors is damaged"):
        load_causal_lm(str(out / "ckpt1"), load_tokenizer(str(out / "ckpt1")))


def test_a_damaged_cache_entry_is_rebuilt_with_one_line(tiny_model, tmp_path, capsys):
    from helpers import write_split
    from utils.data.encoders import SFTEncoder
    from utils.data.tokenisation import Tokenisation
    from utils.data.tokenised_datasets import build_dataset
    from utils.data.dataset_names import load_raw_datasets
    from utils.model_utils import load_tokenizer

    write_split(tmp_path / "d", "train", [{"prompt": "a film", "chosen": f"good fun {i}"} for i in range(20)])
    tok = Tokenisation(load_tokenizer(tiny_model), 32, 8)

    def build():
        return build_dataset(load_raw_datasets([f"d/sft:{tmp_path / 'd'}"]), "train", tok, str(tmp_path / "cache"),
                             {"stage": "sft"}, SFTEncoder)[0]["input_ids"]
    first = [list(ids) for ids in build()]  # read now: the dataset maps the file it reads
    (arrow,) = (tmp_path / "cache").glob("*/*.arrow")
    with open(arrow, "r+b") as f:
        f.truncate(arrow.stat().st_size // 2)
    capsys.readouterr()
    assert [list(ids) for ids in build()] == first
    assert re.search(r"\.arrow is damaged \(\d+ bytes, written with \d+\): rebuilding this cache entry",
                     capsys.readouterr().out)


def test_damaged_cached_reference_logps_are_computed_again(tmp_path, capsys):
    import numpy as np
    from utils.reference_logps import read_cached_logps

    path = tmp_path / "ref_logps.npy"
    np.save(path, np.zeros((5, 2)))
    assert read_cached_logps(str(path), (5, 2)).shape == (5, 2)
    assert read_cached_logps(str(path), (6, 2)) is None and "holds (5, 2), expected (6, 2)" in capsys.readouterr().out
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    assert read_cached_logps(str(path), (5, 2)) is None
    assert "unreadable" in capsys.readouterr().out
    assert read_cached_logps(str(tmp_path / "none.npy"), (5, 2)) is None
