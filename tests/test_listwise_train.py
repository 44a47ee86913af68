"""The listwise baselines through the alignment stage: every new loss trains on 2 CPU ranks from
the command line and moves the policy toward the labels (under a spread of ZeRO stages, LoRA,
the online reference and prefix sharing); the reference-free loss never touches a reference;
data a loss cannot use is refused before training; a SimPO run resumes exactly."""
import json
import re
import signal

import pytest
from helpers import finish, launcher, run, start, write_split
from safetensors.torch import load_file

TINY = ["--max_seq_len", "48", "--max_gen_len", "16", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
        "--seed", "7"]


def evals(stdout):
    """{step: {metric: value}} from the `[eval step N] name=value ...` lines."""
    return {int(step): {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", rest)}
            for step, rest in re.findall(r"\[eval step (\d+)\] (.*)", stdout)}


def align(model, data, out, cache, *flags, ranks=2):
    cmd = [*launcher(ranks), "src/train_exo.py", "--model_name_or_path", model, "--data_name_path", data,
           "--output_dir", str(out), "--data_output_path", str(cache), *TINY, *flags]
    return run(cmd, timeout=600)


CASES = {  # loss: (data kind, K, flags that vary the machinery around it)
    "dpo-pl": ("rw", 4, ["--zero_stage", "3"]),
    "nca-rw": ("rw", 4, ["--zero_stage", "2", "--prefix_sharing", "off", "--no-fused_logprobs"]),
    "nca-pref": ("pref", 2, ["--zero_stage", "1", "--beta_pi", "1.0", "--learning_rate", "1e-3"]),
    # the toy rewards go negative, so LiPO's gains come from their win rates
    "lipo": ("rw", 4, ["--zero_stage", "0", "--beta_pi", "1.0", "--lipo_labels", "win_rates"]),
    "ipo": ("pref", 2, ["--zero_stage", "3", "--ref_logps", "online", "--beta_pi", "1.0"]),
    "simpo": ("rw", 4, ["--zero_stage", "2", "--lora_dim", "8", "--learning_rate", "2e-2", "--beta_pi", "2.0",
                        "--ref_name_or_path", "/nonexistent/reference"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", list(CASES))
def test_each_listwise_loss_trains_on_two_ranks_toward_the_labels(tiny_model, align_data, tmp_path, loss_type):
    """The eval loss falls and the best-labelled candidate's implicit reward rises above the
    others' (rewards/margins up, and positive at the end)."""
    kind, k, flags = CASES[loss_type]
    result = align(tiny_model, f"toy/{kind}:{align_data[kind]}", tmp_path / "run", tmp_path / "cache",
                   "--loss_type", loss_type,
                   "--num_contrastive", str(k), "--num_train_epochs", "2", "--print_loss", *flags)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train = [float(v) for v in re.findall(r"\[train step \d+\] loss=(\S+)", result.stdout)]
    assert sum(train[-4:]) / 4 < train[0], train  # it lowers its own objective
    log = evals(result.stdout)
    first, last = log[0], log[max(log)]
    assert last["rewards/margins"] > first["rewards/margins"] and last["rewards/margins"] > 0, log
    assert last["rewards/accuracies"] > first["rewards/accuracies"], log
    assert ("kl" in last) == (loss_type != "simpo")
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| loss type | `{loss_type}` |" in card
    if loss_type == "simpo":
        assert "| reference model | none (a reference-free loss) |" in card and "| SimPO margin gamma | 0.5 |" in card
        assert "reference log-probs" not in result.stdout + result.stderr
        assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("ref_logps_")]


def _write(directory, records):
    for split in ("train", "test"):
        write_split(str(directory), split, records)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pref data, K = 4", "lipo, negative rewards"])
def test_data_a_loss_cannot_use_is_refused_before_training(tiny_model, align_data, tmp_path, case):
    if case == "pref data, K = 4":
        data, flags = f"toy/pref:{align_data['pref']}", ["--loss_type", "dpo-pl", "--num_contrastive", "4"]
        expected = "pref records hold one pair (chosen, rejected), so no ranking of more"
    else:
        _write(tmp_path / "neg", [{"prompt": "the movie", "completions": ["good", "bad", "dull"],
                                   "rewards": [-1.0, -2.0, -3.0]}] * 4)
        data, flags = f"toy/rw:{tmp_path / 'neg'}", ["--loss_type", "lipo", "--num_contrastive", "3"]
        expected = "field \"rewards\": candidates 0..2: the ideal DCG"
    result = align(tiny_model, data, tmp_path / "run", tmp_path / "cache", *flags, ranks=1)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_simpo_stopped_by_sigterm_resumes_exactly(tiny_model, align_data, tmp_path):
    """A reference-free run checkpoints on SIGTERM and --resume auto continues it to the same
    per-step losses and weights as a run never stopped."""
    import psutil

    data = f"toy/rw:{align_data['rw']}"
    flags = ["--loss_type", "simpo", "--num_contrastive", "2", "--zero_stage", "2", "--max_iter_step", "6",
             "--save_step_interval", "1", "--keep_last_n", "2", "--print_loss", "--lr_scheduler_type", "cosine"]

    def command(out, *extra):
        return [*launcher(2), "src/train_exo.py", "--model_name_or_path", tiny_model, "--data_name_path", data,
                "--output_dir", str(out), "--data_output_path", str(tmp_path / "cache"), *TINY, *flags, *extra]

    losses = lambda text: dict(re.findall(r"\[train step (\d+)\] loss=(\S+)", text))
    reference = finish(start(command(tmp_path / "ref")))
    assert "saved the final model" in reference, reference[-3000:]

    process = start(command(tmp_path / "run"))
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "[train step 2]" in line:
            for child in psutil.Process(process.pid).children(recursive=True):
                cmdline = " ".join(child.cmdline())
                if "train_exo.py" in cmdline and "deepspeed.launcher" not in cmdline:
                    child.send_signal(signal.SIGTERM)
            break
    stopped_output = "".join(seen) + finish(process)
    assert process.returncode == 0 and "saved the final model" not in stopped_output, stopped_output[-3000:]

    resumed = finish(start(command(tmp_path / "run", "--resume", "auto")))
    start_step = int(re.search(r"resumed from .* at step (\d+)", resumed).group(1))
    expected = {s: v for s, v in losses(reference).items() if int(s) > start_step}
    assert losses(resumed) == expected and expected
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "ref", tmp_path / "run"))
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6


@pytest.mark.slow
def test_continue_from_makes_two_runs_one(tiny_model, align_data, tmp_path):
    """--continue_from (what online rounds pass) takes the weights, AdamW state and data position
    of a finished run: 2 steps, then 2 more continued from them, are the steps and weights of one
    4-step run (constant LR: the schedule is the one thing a continued run starts afresh)."""
    data = f"toy/rw:{align_data['rw']}"
    flags = ["--loss_type", "exo-rw", "--num_contrastive", "2", "--zero_stage", "2", "--print_loss",
             "--lr_scheduler_type", "constant", "--num_save_checkpoint", "1"]
    losses = lambda text: list(re.findall(r"\[train step \d+\] loss=(\S+)", text))

    def argv(model, out, *extra):
        return ["--model_name_or_path", model, "--data_name_path", data, "--output_dir", str(out),
                "--data_output_path", str(tmp_path / "cache"), *TINY, *flags, *extra]

    # the three runs one after the other in one 2-rank launch (tests/run_mains.py: one start-up)
    argvs = [argv(tiny_model, tmp_path / "whole", "--max_iter_step", "4"),
             argv(tiny_model, tmp_path / "first", "--max_iter_step", "2"),
             argv(str(tmp_path / "first"), tmp_path / "second", "--max_iter_step", "2", "--ref_name_or_path", tiny_model,
                  "--continue_from", str(tmp_path / "first" / "ds_checkpoints"))]
    (tmp_path / "argvs.json").write_text(json.dumps(argvs))
    result = run([*launcher(2), "tests/run_mains.py", "src/train_exo.py", str(tmp_path / "argvs.json")], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    whole, first, second = result.stdout.split("saved the final model")[:3]
    assert "continuing from" in second and "continuing from" not in whole + first
    assert losses(first) + losses(second) == losses(whole) and len(losses(whole)) == 4
    a, b = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "whole", tmp_path / "second"))
    assert max((a[n] - b[n]).abs().max().item() for n in a) <= 1e-6

    # a continued run must have the batch layout the checkpoint was written with
    refused = align(str(tmp_path / "first"), data, tmp_path / "third", tmp_path / "cache", *flags,
                    "--max_iter_step", "2", "--ref_name_or_path", tiny_model, "--per_device_train_batch_size", "1",
                    "--continue_from", str(tmp_path / "first" / "ds_checkpoints"))
    assert refused.returncode != 0 and "per_device_train_batch_size" in refused.stderr.strip().splitlines()[-1]
