"""What a launch prints: the known, harmless messages go, what a user must act on stays.
(The end-to-end check of a 2-rank launch's output is in test_tracking.py, on its shared run.)"""
import io
import logging
import os
import shutil

from safetensors.torch import load_file, save_file
from tqdm import tqdm

from utils import ds_utils
from utils.model_utils import load_reward_model, load_tokenizer
from utils.tracking import _OneLinePerRefresh


def load_reports(path):
    """The LOAD REPORT messages transformers logs while load_reward_model(path) runs."""
    reports, collect = [], logging.Handler()
    collect.emit = lambda record: reports.append(record.getMessage())
    logging.getLogger("transformers.modeling_utils").addHandler(collect)
    try:
        load_reward_model(path, load_tokenizer(path))
    finally:
        logging.getLogger("transformers.modeling_utils").removeHandler(collect)
    return [r for r in reports if "LOAD REPORT" in r]


def test_reward_model_from_a_causal_lm_says_one_line_not_a_load_report(tiny_model, capfd):
    assert load_reports(tiny_model) == []
    out, _ = capfd.readouterr()
    assert f"{tiny_model}: a causal LM, so the reward head (score.weight) starts from random weights" in out


def test_a_broken_checkpoints_load_report_still_shows(tiny_model, tmp_path, capfd):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if ".h.0." in k and k.endswith("weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, broken / "model.safetensors",
              metadata={"format": "pt"})
    (report,) = load_reports(str(broken))
    assert dropped.split(".", 1)[-1] in report and "MISSING" in report
    assert "starts from random weights" not in capfd.readouterr().out


def test_progress_in_a_log_is_whole_lines(capsys):
    """Off a terminal each refresh is a line of its own and the step lines stay whole."""
    log = io.StringIO()
    bar = tqdm(total=3, desc="train", file=_OneLinePerRefresh(log), mininterval=0)
    for step in range(1, 4):
        tqdm.write(f"[train step {step}] loss=1")
        bar.update()
    bar.close()
    assert "\r" not in log.getvalue()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("train:   0%") and lines[-1].startswith("train: 100%") and len(lines) >= 4
    assert capsys.readouterr().out.splitlines() == [f"[train step {s}] loss=1" for s in (1, 2, 3)]


def test_a_compiled_op_is_announced_only_when_it_must_compile(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    ds_utils._say_if_op_must_compile("cpu_adam", "CPU Adam")
    assert "compiling DeepSpeed's CPU Adam (cpu_adam)" in capsys.readouterr().out
    open(os.path.join(tmp_path, "cpu_adam.so"), "w").close()
    ds_utils._say_if_op_must_compile("cpu_adam", "CPU Adam")
    assert capsys.readouterr().out == ""
