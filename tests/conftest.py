"""Shared fixtures: `src/` on the import path, no hub access, tiny local models."""
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src"
sys.path.insert(0, str(SRC))

# Nothing in the suite may reach a model hub; fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vllm (inference_sft --backend vllm); run in the vLLM venv "
                                       "that .ci/run makes, as python -m pytest -m vllm tests (README: Tests)")

WORDS = "the a movie film plot acting story scene actor music was and it very".split()
POSITIVE, NEGATIVE = ["good", "great", "fun"], ["bad", "awful", "dull"]


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS + POSITIVE + NEGATIVE) for _ in range(n))


def _reward(text, rng):
    words = text.split()
    # + tiny noise so no two candidates tie (pref losses need a single winner)
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words) + rng.random() * 1e-3


def write_split(directory, split, records):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{split}.json"), "w") as f:
        json.dump(records, f)


@pytest.fixture(scope="session")
def align_data(tmp_path_factory):
    """Learnable synthetic data: rw records with 4 completions scored by sentiment words,
    and pref records (the best and worst of them). Returns {"rw": dir, "pref": dir}."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("align_data")
    dirs = {"rw": str(root / "toy_rw"), "pref": str(root / "toy_pref")}
    for split, n in (("train", 64), ("test", 16)):
        rw, pref = [], []
        for _ in range(n):
            prompt = _sentence(rng, rng.randint(2, 6))
            completions = [_sentence(rng, rng.randint(2, 8)) for _ in range(4)]
            rewards = [_reward(c, rng) for c in completions]
            rw.append({"prompt": prompt, "completions": completions, "rewards": rewards})
            ranked = sorted(zip(rewards, completions))
            pref.append({"prompt": prompt, "chosen": ranked[-1][1], "rejected": ranked[0][1]})
        write_split(dirs["rw"], split, rw)
        write_split(dirs["pref"], split, pref)
    return dirs


def _align_texts(align_data):
    texts = [" ".join(WORDS + POSITIVE + NEGATIVE)] * 4
    with open(os.path.join(align_data["rw"], "train.json")) as f:
        for record in json.load(f):
            texts += [record["prompt"], *record["completions"]]
    return texts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, align_data):
    """A tiny GPT-2 and tokenizer trained on the synthetic data's text (no pad token)."""
    from utils.tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "gpt2"), _align_texts(align_data), arch="gpt2",
                           seed=0)


@pytest.fixture(scope="session")
def tiny_model_of(tmp_path_factory, align_data, tiny_model):
    """arch -> a tiny model of make_tiny_model's `arch` (gpt2: tiny_model), tokenizer as tiny_model's."""
    from utils.tiny_model import make_tiny_model

    made = {"gpt2": tiny_model}

    def of(arch):
        if arch not in made:
            made[arch] = make_tiny_model(str(tmp_path_factory.mktemp("tiny") / arch), _align_texts(align_data),
                                         arch=arch, seed=0)
        return made[arch]
    return of


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


@pytest.fixture(scope="session")
def easy_pref_data(tmp_path_factory):
    """pref records a reward model learns in a few epochs: the chosen completion holds 1-2
    positive words among neutral ones, the rejected one 1-2 negative words (same vocabulary
    as `tiny_model`'s tokenizer). 128 train and 32 test pairs. Returns the directory."""
    rng = random.Random(1)
    directory = str(tmp_path_factory.mktemp("easy_pref") / "easy_pref")

    def completion(sentiment):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 5))]
        words += [rng.choice(sentiment) for _ in range(rng.randint(1, 2))]
        rng.shuffle(words)
        return " ".join(words)

    for split, n in (("train", 128), ("test", 32)):
        write_split(directory, split, [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
                                        "chosen": completion(POSITIVE), "rejected": completion(NEGATIVE)}
                                       for _ in range(n)])
    return directory
