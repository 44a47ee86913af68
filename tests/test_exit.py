"""How an entry script's process ends (`utils.distributed.run_stage`).

A run that succeeded must exit 0. Left to interpreter teardown it may not: DeepSpeed holds its
gloo groups from every parameter, so their worker threads outlive the exit handlers, and one
that needs the interpreter lock after teardown has begun aborts the process ("terminate called
without an active exception", exit -6). The probe below provokes that every time; the same
probe ended by `run_stage` exits 0. `run_stage` otherwise ends a process as the interpreter
would: the same exit status, exit handlers run, thread pools ended, non-daemon threads waited for.
"""
import sys
import textwrap

import pytest
from conftest import run

# A gloo collective on a held subgroup finishes on its worker thread, which then runs Python
# (a future's callback) while interpreter teardown is under way (an object that is slow to
# delete keeps it going).
TEARDOWN_PROBE = textwrap.dedent('''
    import argparse, sys, time
    import torch
    from utils.distributed import init_distributed, run_stage

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
        run_stage(main) if sys.argv[1] == "run_stage" else main()
''')


def teardown_probe(tmp_path, ending):
    script = tmp_path / "probe.py"
    script.write_text(TEARDOWN_PROBE)
    return run(["torchrun", "--standalone", "--nproc_per_node", "2", str(script), ending], timeout=180)


def test_a_collective_ending_during_teardown_aborts_a_plain_exit(tmp_path):
    """The hazard is real on this torch: if this stops failing, run_stage's reason is gone."""
    result = teardown_probe(tmp_path, "plain")
    assert result.returncode != 0 and "terminate called without an active exception" in result.stderr, \
        result.stderr[-3000:]


def test_run_stage_exits_0_where_teardown_would_abort(tmp_path):
    result = teardown_probe(tmp_path, "run_stage")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr


ENDINGS = textwrap.dedent('''
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from utils.distributed import run_stage
    from utils.fileio import InputError, cli_main

    @cli_main
    def main():
        ending = sys.argv[1]
        atexit.register(print, "exit handler ran")
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
        ThreadPoolExecutor(2).submit(time.sleep, 0)  # its idle worker ends at exit, as the interpreter ends it
        if ending == "exit 3":
            sys.exit(3)
        if ending == "exit text":
            sys.exit("stopped: text")
        if ending == "input error":
            raise InputError("data.json record 2 field \\"prompt\\": missing")
        if ending == "exception":
            raise RuntimeError("boom")

    run_stage(main)
''')


@pytest.mark.parametrize("ending, status, stderr_has", [
    ("return", 0, None),
    ("exit 3", 3, None),
    ("exit text", 1, "stopped: text"),
    ("input error", 2, 'error: data.json record 2 field "prompt": missing'),
    ("exception", 1, "RuntimeError: boom"),
])
def test_run_stage_ends_as_the_interpreter_would(tmp_path, ending, status, stderr_has):
    script = tmp_path / "endings.py"
    script.write_text(ENDINGS)
    result = run([sys.executable, str(script), ending], timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert result.stdout.splitlines()[-2:] == ["thread finished", "exit handler ran"]
    if stderr_has:
        assert stderr_has in result.stderr
    if ending == "exception":
        assert "Traceback (most recent call last)" in result.stderr
