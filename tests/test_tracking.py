"""--report_to (TensorBoard, W&B in offline mode), the model card of every export, and a
2-rank launch's output free of the known, harmless library messages (utils/quiet.py)."""
import argparse
import glob
import shutil
import struct
import sys

import pytest
from huggingface_hub import metadata_load

from helpers import launcher, run
from utils.fileio import InputError
from utils.tracking import check_trackers


def wandb_records(run_file):
    """The protobuf records of a W&B run file (a LevelDB-style log: 32 KiB blocks of chunks, each
    with a 7-byte header crc32, length, type; FULL = 1, FIRST = 2, MIDDLE = 3, LAST = 4)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model, align_data):
    """One 2-step train_exo run on 2 ranks (LoRA, gradient checkpointing, ZeRO-2) reporting to
    TensorBoard and W&B (offline), exporting ckpt1 and ckpt2, from a copy of the tiny model
    whose own card names its Hub base model. Returns (output dir, console output)."""
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("tracked")
    init = root / "init"
    shutil.copytree(tiny_model, init)
    (init / "README.md").write_text("---\nbase_model: openai-community/gpt2\nlibrary_name: transformers\n---\n# init\n")
    out = root / "out"
    result = run([*launcher(2), "src/train_exo.py", "--model_name_or_path", str(init),
                  "--data_name_path", f"toy/rw:{align_data['rw']}", "--loss_type", "exo-rw", "--num_contrastive", "2",
                  "--beta_pi", "0.25", "--beta_r", "0.75", "--max_seq_len", "48", "--max_gen_len", "16",
                  "--max_iter_step", "2", "--num_save_checkpoint", "2", "--per_device_train_batch_size", "8",
                  "--per_device_eval_batch_size", "16", "--data_output_path", str(root / "cache"),
                  "--lora_dim", "4", "--gradient_checkpointing", "--zero_stage", "2",
                  "--report_to", "tensorboard,wandb", "--output_dir", str(out)],
                 env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_a_launch_prints_none_of_the_known_harmless_messages(tracked_run):
    _, output = tracked_run
    for known in ("gradient_checkpointing_enable` is deprecated", "all_gather_into_tensor` is deprecated",
                  "reduce_scatter_tensor` is deprecated", "is_gradient_checkpointing` is deprecated",
                  "fan_in_fan_out is set to False", "strongly recommend passing in an `attention_mask`"):
        assert known not in output
    # the launcher's two processes say it; the ranks no longer repeat it
    assert output.count("Setting accelerator to CPU") <= 2
    assert output.count("saved the final model") == 1
    assert output.count("Loading weights:   0%") <= 2  # rank 0's: the reference and the policy
    assert "\r[train step" not in output and "\r[eval step" not in output  # step lines stand whole


@pytest.mark.slow
def test_wandb_logs_the_tensorboard_scalars_and_the_flags(tracked_run):
    tracked_run, _ = tracked_run
    (run_file,) = glob.glob(str(tracked_run / "wandb" / "offline-run-*" / "run-*.wandb"))
    records = wandb_records(run_file)
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): float(item.value_json) for item in record.history.item}
            step = int(items.pop("_step"))
            logged.update({(name, step): value for name, value in items.items() if not name.startswith("_")})
    scalars = tensorboard_scalars(str(tracked_run / "tensorboard"))
    assert {"train/loss", "eval/loss", "train/rewards/margins", "train/lr"} <= {name for name, _ in scalars}
    assert logged.keys() == scalars.keys()
    for key, value in scalars.items():  # TensorBoard keeps float32
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: item.value_json for item in run_record.config.update}
    assert config["loss_type"] == '"exo-rw"' and config["num_contrastive"] == "2" and config["beta_pi"] == "0.25"


@pytest.mark.slow
@pytest.mark.parametrize("export, steps", [("ckpt1", "1 of 2"), ("ckpt2", "2 of 2"), (".", "2 of 2")])
def test_every_export_has_a_model_card(tracked_run, export, steps):
    tracked_run, _ = tracked_run
    card = tracked_run / export / "README.md"
    metadata = metadata_load(card)
    assert metadata["base_model"] == "openai-community/gpt2"  # from the initial model's own card
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"exo", "exo-rw"} <= set(metadata["tags"])
    body = card.read_text()
    for row in ("| stage | `train_exo` |", "| LoRA rank (merged) | 4 |", "| loss type | `exo-rw` |", "| K (candidates per group) | 2 |",
                "| beta_pi / beta_r | 0.25 / 0.75 |", f"| optimizer steps | {steps} |", "toy/rw:"):
        assert row in body
    assert "# on 2 ranks" in body and "src/train_exo.py --model_name_or_path" in body
    assert "--report_to tensorboard,wandb" in body and "local_rank" not in body
    assert "AutoModelForCausalLM.from_pretrained" in body


def test_reward_model_card(tiny_model, tmp_path, monkeypatch):
    """A reward model's card: no base_model for a local model without a card, the reward-model
    tag, text-classification, and the snippet that scores text with it."""
    from transformers import AutoModelForSequenceClassification

    from utils.model_card import model_card

    monkeypatch.setattr(sys, "argv", ["src/train_rm.py", "--model_name_or_path", tiny_model, "--local_rank=0"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    args = argparse.Namespace(model_name_or_path=tiny_model, data_name_path=["toy/pref:data"], learning_rate=1e-5,
                              lr_scheduler_type="cosine", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                              lora_dim=0, dtype="fp32", seed=1, output_dir="models/rm")
    path = tmp_path / "README.md"
    path.write_text(model_card(args, model, "models/rm", 10, 10, world_size=2))
    metadata = metadata_load(path)
    assert "base_model" not in metadata
    assert metadata["pipeline_tag"] == "text-classification" and "reward-model" in metadata["tags"]
    body = path.read_text()
    assert "AutoModelForSequenceClassification.from_pretrained(\"models/rm\")" in body
    assert "| batch per optimizer step | 16 |" in body
    assert "deepspeed src/train_rm.py --model_name_or_path" in body and "local_rank" not in body


def test_report_to_parsing(monkeypatch):
    def trackers(report_to, enable_tensorboard=False):
        args = argparse.Namespace(report_to=report_to, enable_tensorboard=enable_tensorboard)
        check_trackers(args)
        return args.report_to

    assert trackers("tensorboard") == ["tensorboard"]
    assert trackers("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    assert trackers("none") == [] and trackers("none", enable_tensorboard=True) == ["tensorboard"]
    with pytest.raises(InputError, match="--report_to 'mlflow': expected a comma-separated list"):
        trackers("mlflow")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(InputError, match=r"--report_to wandb needs the wandb package: pip install wandb"):
        trackers("tensorboard,wandb")
