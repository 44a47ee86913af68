"""Run many command lines of the entry scripts as real processes, paying the imports once.

    python tests/forked_cli.py CASES.json RESULTS_DIR

CASES.json is a list of {"argv": ["src/train_exo.py", ...]}. This process imports what the
entry scripts import (torch, transformers, deepspeed: ~8 s on a small CPU box), then forks one
child per case. A child is the process `python src/SCRIPT ARGS` would be, minus those imports:
its own exit code, its own stdout/stderr file descriptors (written to RESULTS_DIR/N.out and
N.err), its own process-group and environment state. An uncaught exception prints its
traceback and exits 1, as the interpreter would. RESULTS_DIR/results.json lists the exit codes.
"""
import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CASE_TIMEOUT_S = 120


def run_case(argv, out_path, err_path):
    """In the forked child: exec the script as __main__ with `argv`; never returns."""
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    signal.alarm(CASE_TIMEOUT_S)  # a hung case dies of SIGALRM instead of hanging the suite
    sys.argv = list(argv)
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - report like the interpreter does
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(cases_path, results_dir):
    sys.path.insert(0, str(SRC))
    os.environ["PYTHONPATH"] = str(SRC)
    # What the entry scripts import; children find it loaded.
    import utils.inference  # noqa: F401
    import utils.training  # noqa: F401

    cases = json.loads(Path(cases_path).read_text())
    codes = []
    for index, case in enumerate(cases):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_case(case["argv"], os.path.join(results_dir, f"{index}.out"), os.path.join(results_dir, f"{index}.err"))
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    Path(results_dir, "results.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    main(*sys.argv[1:])
