"""How an entry script's process ends (`utils.process_exit.run_and_exit`).

A run that succeeded must exit 0. Left to interpreter teardown it may not: DeepSpeed holds its
gloo groups from every parameter, so their worker threads outlive the exit handlers, and one
that needs the interpreter lock after teardown has begun aborts the process ("terminate called
without an active exception", exit -6). The probe below provokes that every time; the same
probe ended by `run_and_exit` exits 0. `run_and_exit` otherwise ends a process as the interpreter
would: the same exit status, exit handlers run, thread pools ended, non-daemon threads waited for.
"""
import sys
import textwrap

import pytest
from helpers import run

# A gloo collective on a held subgroup finishes on its worker thread, which then runs Python
# (a future's callback) while interpreter teardown is under way (an object that is slow to
# delete keeps it going).
TEARDOWN_PROBE = textwrap.dedent('''
    import argparse, sys, time
    import torch
    from utils.distributed import init_distributed
    from utils.process_exit import run_and_exit

    class SlowToDelete:
        def __del__(self, sleep=time.sleep):
            sleep(6)

    def needs_the_interpreter_later(_):
        time.sleep(2)  # past the exit handlers, into teardown

    def main():
        init_distributed(argparse.Namespace(seed=0, dist_timeout_min=1))
        globals()["GROUP"] = group = torch.distributed.new_group([0, 1])
        globals()["SLOW"] = SlowToDelete()
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 1:
            time.sleep(0.3)  # rank 0's collective ends on its worker thread, after main() returned
        work = torch.distributed.all_reduce(torch.ones(4), group=group, async_op=True)
        work.get_future().then(needs_the_interpreter_later)

    if __name__ == "__main__":
        run_and_exit(main) if sys.argv[1] == "run_and_exit" else main()
''')


def teardown_probe(tmp_path, ending):
    script = tmp_path / "probe.py"
    script.write_text(TEARDOWN_PROBE)
    return run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), ending], timeout=180)


@pytest.mark.slow
def test_a_collective_ending_during_teardown_aborts_a_plain_exit(tmp_path):
    """The hazard is real on this torch: if this stops failing, run_and_exit's reason is gone."""
    result = teardown_probe(tmp_path, "plain")
    assert result.returncode != 0 and "terminate called without an active exception" in result.stderr, \
        result.stderr[-3000:]


@pytest.mark.slow
def test_run_and_exit_exits_0_where_teardown_would_abort(tmp_path):
    result = teardown_probe(tmp_path, "run_and_exit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr


ENDINGS = textwrap.dedent('''
    import atexit, concurrent.futures, sys, threading, time
    from utils.process_exit import run_and_exit
    from utils.fileio import InputError, cli_main

    @cli_main
    def main():
        ending = sys.argv[1]
        atexit.register(print, "exit handler ran")
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
        globals()["LEFT_OPEN"] = open(sys.argv[2], "w")  # buffered, never closed: teardown would flush it
        LEFT_OPEN.write("x" * 100)
        globals()["POOL"] = concurrent.futures.ThreadPoolExecutor(2)  # never shut down
        POOL.submit(time.sleep, 0.2)
        if ending == "exit 3":
            sys.exit(3)
        if ending == "exit text":
            sys.exit("stopped: text")
        if ending == "input error":
            raise InputError("data.json record 2 field \\"prompt\\": missing")
        if ending == "exception":
            raise RuntimeError("boom")

    run_and_exit(main)
''')


@pytest.mark.parametrize("ending, status, stderr_has", [
    ("return", 0, None),
    ("exit 3", 3, None),
    ("exit text", 1, "stopped: text"),
    ("input error", 2, 'error: data.json record 2 field "prompt": missing'),
    ("exception", 1, "RuntimeError: boom"),
])
@pytest.mark.slow
def test_run_and_exit_ends_as_the_interpreter_would(tmp_path, ending, status, stderr_has):
    script = tmp_path / "endings.py"
    script.write_text(ENDINGS)
    result = run([sys.executable, str(script), ending, str(tmp_path / "left_open.txt")], timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert (tmp_path / "left_open.txt").read_text() == "x" * 100
    assert result.stdout.splitlines()[-2:] == ["thread finished", "exit handler ran"]
    if stderr_has:
        assert stderr_has in result.stderr
    if ending == "exception":
        assert "Traceback (most recent call last)" in result.stderr


# A run that fails after its last step (the final export: a full disk) must still leave every
# logged scalar in the tracker's file: the trackers are closed on every way out of train().
FAILING_EXPORT = textwrap.dedent('''
    import sys
    import train_sft
    from utils import training
    from utils.process_exit import run_and_exit

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    training.save_hf_model = full_disk
    run_and_exit(lambda: train_sft.main(sys.argv[1:]))
''')


@pytest.mark.slow
def test_an_exception_in_train_loses_no_logged_scalar(tiny_model, align_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    script = tmp_path / "failing_export.py"
    script.write_text(FAILING_EXPORT)
    out = tmp_path / "out"
    result = run([sys.executable, str(script), "--model_name_or_path", tiny_model,
                  "--data_name_path", f"toy/sft:{align_data['pref']}", "--output_dir", str(out),
                  "--data_output_path", str(tmp_path / "cache"), "--max_seq_len", "48", "--max_gen_len", "16",
                  "--max_iter_step", "50", "--num_train_epochs", "100", "--per_device_train_batch_size", "2",
                  "--num_save_checkpoint", "0", "--enable_tensorboard"], timeout=300)
    assert result.returncode == 1 and "No space left on device" in result.stderr, result.stderr[-3000:]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 51))


@pytest.mark.slow
def test_a_rank_whose_peer_stopped_on_bad_input_prints_nothing_of_its_own(tiny_model, tmp_path):
    """2 ranks, a train.json holding one object: rank 0 prints the one error line; rank 1, whose
    barrier in cache_writer_first fails as rank 0 leaves, prints no traceback of its own."""
    import json

    from helpers import launcher

    data = tmp_path / "bad"
    data.mkdir()
    record = {"prompt": "a", "completions": ["b", "c"], "rewards": [1.0, 0.0]}
    (data / "train.json").write_text(json.dumps(record))
    (data / "test.json").write_text(json.dumps([record]))
    result = run([*launcher(2), "src/train_exo.py", "--model_name_or_path", tiny_model,
                  "--data_name_path", f"bad/rw:{data}", "--output_dir", str(tmp_path / "out"),
                  "--data_output_path", str(tmp_path / "cache"), "--loss_type", "exo-rw", "--num_contrastive", "2",
                  "--zero_stage", "0", "--max_seq_len", "64", "--max_gen_len", "16"], timeout=300)
    lines = [line for line in (result.stderr + result.stdout).splitlines()
             if line.strip() and not line.startswith("[20")]  # DeepSpeed's launcher log lines
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines == [f"error: {data / 'train.json'}: expected a JSON list of records, got dict"], lines
