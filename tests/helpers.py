"""Plain helpers and constants the test files share (`from helpers import ...`): where the repo is,
the synthetic vocabulary, data writing, launching the entry scripts as processes, and reading
their outputs. conftest.py keeps the path and environment setup, the markers and the fixtures."""
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"

WORDS = "the a movie film plot acting story scene actor music was and it very".split()
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "awful", "dull"]


def write_split(directory, split, records):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}.json"), "w") as f:
        json.dump(records, f)


def read(path):
    """The JSON a run wrote at `path`."""
    with open(path) as f:
        return json.load(f)


def ok(result):
    """`result` (a CompletedProcess) once it is known to have exited 0; else fail with its output's ends."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(output):
    """{step: loss} of the --print_loss `[train step N] ... loss=X ...` lines in `output`, as floats
    parsed from the logged 6-significant-digit text (so == between runs means equal to the digit)."""
    return {int(s): float(v) for s, v in re.findall(r"\[train step (\d+)\][^\n]*? loss=(\S+)", output)}


def plain_and_once_draws(model, batch, config, temperature, seed=7, after_each=None):
    """{"plain": (ids, per-token log-probs), "once": ...}: what plain generate and
    utils.sampling.generate_once_per_prompt draw from `batch` after the same seed, each
    completion's log-probs recorded as the sampling stage records them; `after_each(mode)` runs
    after each."""
    import torch
    from transformers import LogitsProcessorList
    from utils.sampling import CompletionLogprobs, generate_once_per_prompt

    drawn = {}
    for mode, generate in (("plain", lambda **kw: model.generate(**batch, generation_config=config, **kw)),
                           ("once", lambda **kw: generate_once_per_prompt(model, batch, config, **kw))):
        recorder = CompletionLogprobs(temperature)
        torch.manual_seed(seed)
        with torch.no_grad():
            sequences = generate(logits_processor=LogitsProcessorList([recorder]))
        drawn[mode] = (sequences, recorder.finish(sequences))
        if after_each is not None:
            after_each(mode)
    return drawn


def launcher(ranks):
    """`python`, or deepspeed on `ranks` CPU ranks with a free rendezvous port (runs may overlap)."""
    if ranks == 1:
        return ["python"]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())]


def free_port():
    """A rendezvous port no other run holds now (runs may overlap)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, cwd=REPO_ROOT):
    """Popen in its own process group (launcher and ranks), output merged and line-buffered,
    for a test that watches a run while it goes (to kill it at a chosen moment); see `finish`."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def communicate(process, timeout, what):
    """(stdout, stderr) of a process started in its own group once it ends; a timeout kills the
    whole group and fails the test, naming `what` and showing the output's ends."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        outputs = process.communicate()
        pytest.fail(f"timed out after {timeout}s: {what}\n" + "".join(out[-3000:] for out in outputs if out))


def finish(process, timeout=300):
    """The rest of a `start`ed run's output once it ends; a timeout kills its whole group."""
    return communicate(process, timeout, " ".join(map(str, process.args)))[0]


def run(cmd, timeout=600, env=None, cwd=REPO_ROOT, **kwargs):
    """Run a command (from the repo root unless `cwd`); return the CompletedProcess (text output).

    The command gets its own process group, and a timeout kills the whole group: the
    `deepspeed` launcher does not take its ranks down when it is killed, and orphaned ranks
    would hold the CPU (and their rendezvous) for the rest of the suite."""
    env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, **kwargs) as process:
        stdout, stderr = communicate(process, timeout, " ".join(map(str, cmd)))
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def forked_runs(root, argvs, timeout=600):
    """Each argv (["src/SCRIPT.py", *args]) run as a process of its own, forked from one that
    paid the entry scripts' imports once (tests/forked_cli.py), from the repo root: a
    CompletedProcess each (its exit code and output), in order. Files go under `root`."""
    root = Path(root)
    results = root / "results"
    results.mkdir(parents=True)
    (root / "cases.json").write_text(json.dumps([{"argv": [str(a) for a in argv]} for argv in argvs]))
    ok(run(["python", str(REPO_ROOT / "tests" / "forked_cli.py"), str(root / "cases.json"), str(results)],
           timeout=timeout))
    codes = json.loads((results / "results.json").read_text())
    return [subprocess.CompletedProcess(argv, codes[i], (results / f"{i}.out").read_text(),
                                        (results / f"{i}.err").read_text()) for i, argv in enumerate(argvs)]
