"""The five launchers in pipeline order, as a new user runs them: SFT -> sample -> RM -> score
-> align, each stage reading the previous one's output from its documented place. The training
launchers also write their training.log and TensorBoard runs; align runs on the launchers'
default devices (2 CPU ranks without a GPU), the rest on DEVICE_IDS=0. (This test is also the
launcher test of train_rm.sh and train_exo.sh: tests/test_train_{exo,sft_rm}.py launched the same
runs once more.)"""
import json
import os

import pytest
from helpers import run
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

# every test here starts processes: the slow tier (conftest.py enforces the mark)
pytestmark = pytest.mark.slow

SMALL = ["--max_seq_len", "48", "--max_gen_len", "16"]
TRAIN = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_iter_step", "2"]


def launch(script, *args, env):
    result = run(["bash", f"exp/custom_exp/{script}", *args], env=env, timeout=600)
    assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_launchers_in_pipeline_order(tiny_model, easy_pref_data, tmp_path):
    """Each stage's output appears where the next stage (and the README's stage table) expects it."""
    env = {"OUTPUT_ROOT": str(tmp_path / "models"), "TB_ROOT": str(tmp_path / "tb"), "DEVICE_IDS": "0"}
    cache = ["--data_output_path", str(tmp_path / "cache")]
    sft_data = tmp_path / "toy"
    os.makedirs(sft_data)
    for split in ("train", "test"):  # sft records from the preference data's chosen side
        with open(os.path.join(easy_pref_data, f"{split}.json")) as f:
            pref = json.load(f)[:16]
        with open(sft_data / f"{split}.json", "w") as f:
            json.dump([{"prompt": r["prompt"], "chosen": r["chosen"]} for r in pref], f)

    launch("train_sft.sh", "tiny", tiny_model, "base", "toy/sft", str(sft_data), *SMALL, *TRAIN, *cache,
           env=env)
    sft_model = tmp_path / "models" / "tiny_toy" / "sft"
    AutoModelForCausalLM.from_pretrained(sft_model)

    for split in ("train", "test"):
        launch("inference_sft.sh", "0", f"toy/sft:{sft_data}", split, str(sft_model), "--return_num", "2",
               "--max_new_tokens", "8", "--max_length", "48", env=env)
    with open(tmp_path / "toy_sft" / "train.json") as f:
        gen = json.load(f)
    assert len(gen) == 16 and all(len(r["completions"]) == 2 for r in gen)

    tb_runs = set(os.listdir(tmp_path / "tb"))  # the SFT run's
    assert tb_runs and (sft_model / "training.log").exists()
    launch("train_rm.sh", "tiny", str(sft_model), "sft", "toy/pref", easy_pref_data, *SMALL, *TRAIN, *cache,
           env=env)
    rm_model = tmp_path / "models" / "tiny_toy" / "rm"
    AutoModelForSequenceClassification.from_pretrained(rm_model)
    assert (rm_model / "training.log").exists() and set(os.listdir(tmp_path / "tb")) > tb_runs
    tb_runs = set(os.listdir(tmp_path / "tb"))

    for split in ("train", "test"):
        launch("inference_rm.sh", "0", str(tmp_path / "toy_sft"), split, str(rm_model), "label", *SMALL, env=env)
    with open(tmp_path / "toy_rw" / "train.json") as f:
        rw = json.load(f)
    assert [r["prompt"] for r in rw] == [r["prompt"] for r in gen]
    assert all(len(r["rewards"]) == 2 for r in rw)

    default_devices = {k: v for k, v in env.items() if k != "DEVICE_IDS"}
    launch("train_exo.sh", "tiny", str(sft_model), "sft", "toy/rw", str(tmp_path / "toy_rw"), "exo-rw", "2",
           *SMALL, *TRAIN, *cache, "--num_save_checkpoint", "2", env=default_devices)
    run_dir = tmp_path / "models" / "tiny_toy" / "align_exo-rw_nc2"
    for ckpt in ("ckpt1", "ckpt2"):
        AutoModelForCausalLM.from_pretrained(run_dir / ckpt)
    assert (run_dir / "training.log").exists() and set(os.listdir(tmp_path / "tb")) > tb_runs
