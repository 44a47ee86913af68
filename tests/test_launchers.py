"""The launchers' process tree (exp/custom_exp/common.sh): a signal to any of its processes
checkpoints the ranks, and a run refused for bad input says so once and leaves nothing behind.
Real 2-rank CPU runs under the deepspeed launcher."""
import os
import signal
import subprocess

import psutil
import pytest
from helpers import REPO_ROOT, SRC, run

# every test here starts processes: the slow tier (conftest.py enforces the mark)
pytestmark = pytest.mark.slow

# 64 records x 2 groups of K=2 / (4 x 2 ranks) = 16 steps an epoch, no accumulation
SHORT = ["--max_seq_len", "48", "--max_gen_len", "16", "--gradient_accumulation_steps", "1", "--max_iter_step", "12",
         "--num_save_checkpoint", "0"]


def train_exo_sh(model, data, tmp_path, num_contrastive, *flags):
    return (["bash", "exp/custom_exp/train_exo.sh", "tiny", model, "sft", "toy/rw", data["rw"], "exo-rw",
             str(num_contrastive), "--data_output_path", str(tmp_path / "cache"), *SHORT, *flags],
            {"OUTPUT_ROOT": str(tmp_path / "models"), "TB_ROOT": str(tmp_path / "tb")})


def test_bad_input_on_two_ranks_is_one_line_exit_2_and_no_directory(tiny_model, align_data, tmp_path):
    """Every rank refuses --num_contrastive 1: one `error:` line (rank 0's), none of DeepSpeed's
    2 KB failure line, exit code 2, and no output directory or training.log."""
    cmd, env = train_exo_sh(tiny_model, align_data, tmp_path, 1)
    result = run(cmd, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: --num_contrastive 1: contrasting needs at least 2 candidates"], output[-3000:]
    assert "exits with return code" not in output
    assert not (tmp_path / "models").exists()


def test_sigterm_to_the_deepspeed_process_checkpoints_the_ranks(tiny_model, align_data, tmp_path):
    """SIGTERM to the `deepspeed` process inside the launcher script (what `kill PID` of it
    does): the ranks still finish their step, checkpoint and exit; nothing is left running and
    the run's log holds the step lines without progress-bar redraws."""
    # 12 steps pass in about a second, less than the signal's way (the script's trap, ps, kill)
    # may take on a loaded machine: 400 steps (~30 s) leave the signal time to end the run
    cmd, env = train_exo_sh(tiny_model, align_data, tmp_path, 2, "--num_train_epochs", "25", "--max_iter_step", "400")
    # COLUMNS=80 (pytest-xdist's workers export it, as do some login shells) once cut ps's command
    # lines short of the rank's script name, so the launcher found no rank to stop
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "80", **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "[train step 2]" in line:
                runner = next(p for p in psutil.Process(process.pid).children(recursive=True)
                              if "bin/deepspeed" in " ".join(p.cmdline()))
                runner.send_signal(signal.SIGTERM)
                break
        output = "".join(lines) + process.communicate(timeout=300)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]  # the deepspeed process's own code
    assert "stopped by a signal after step" in output and "saved the final model" not in output, output[-3000:]
    run_dir = tmp_path / "models" / "tiny_toy" / "align_exo-rw_nc2"
    assert (run_dir / "ds_checkpoints" / "latest").is_file()
    log = (run_dir / "training.log").read_text()
    assert "[train step 2]" in log and "\r" not in log
    cache = str(tmp_path / "cache")
    assert not [p for p in psutil.process_iter(["cmdline"]) if cache in " ".join(p.info["cmdline"] or [])]
