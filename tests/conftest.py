"""Path and environment setup, markers and fixtures (plain helpers live in helpers.py).

Tiers: a test that starts a process (the entry scripts through `helpers.run`/`start`, deepspeed
launches, several ranks) is marked `slow`; `python -m pytest -m "not slow" tests` runs the rest
in minutes. The tier is enforced: while a test not marked slow is set up, runs and is torn down
(its fixtures included), subprocess.Popen fails it and names the mark it lacks."""
import os
import sys

from helpers import NEGATIVE, POSITIVE, SRC, WORDS, write_split

sys.path.insert(0, str(SRC))

# Nothing in the suite may reach a model hub; fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import json  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs vllm (inference_sft --backend vllm); run in the vLLM venv "
                                       "that .ci/run makes, as python -m pytest -m vllm tests (README: Tests)")
    config.addinivalue_line("markers", "slow: starts a process (an entry script, a deepspeed launch, several ranks); "
                                       "the fast tier is python -m pytest -m \"not slow\" tests")


class _NoProcessesHere(subprocess.Popen):
    """subprocess.Popen while a test not marked slow runs: refuses to start anything."""
    item = None

    def __init__(self, args, *rest, **kwargs):
        pytest.fail(f"{self.item.nodeid} started a process ({args!r}) but is not marked slow: mark it "
                    "@pytest.mark.slow (or its module pytestmark = pytest.mark.slow), or run the code in-process; "
                    "a session fixture that starts processes must be used by slow tests only", pytrace=False)


def _guard_processes(item):
    if item.get_closest_marker("slow") is not None:
        yield
        return
    real, _NoProcessesHere.item = subprocess.Popen, item
    subprocess.Popen = _NoProcessesHere
    try:
        yield
    finally:
        subprocess.Popen = real


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _guard_processes(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _guard_processes(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _guard_processes(item)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS + POSITIVE + NEGATIVE) for _ in range(n))


def _reward(text, rng):
    words = text.split()
    # + tiny noise so no two candidates tie (pref losses need a single winner)
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words) + rng.random() * 1e-3


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
