"""`run_and_exit`: how an entry script's process ends, with its status and without teardown.

`run_and_exit(main)` runs the script's main, then exits with its status without interpreter
teardown, which can abort a run that succeeded.
"""
import atexit
import faulthandler
import gc
import io
import os
import signal
import sys
import threading
import time

import torch

# Seconds a rank whose collective failed because a peer stopped waits before it exits (see run_and_exit).
PEER_STOPPED_GRACE_S = 3


def run_and_exit(main):
    """Run an entry script's `main()`, then end the process with its exit status.

    Everything a normal exit does runs first: shutting thread pools down and waiting for
    non-daemon threads, the exit handlers (leaving the process group, logging), flushing the
    files left open. Interpreter teardown is then skipped, because it
    can abort a run that succeeded: DeepSpeed holds its gloo process groups from every
    parameter, so their C++ worker threads outlive the exit handlers, and one still freeing a
    finished collective's tensors when teardown begins needs the interpreter lock, cannot get
    it, and takes the process down ("terminate called without an active exception", exit -6).
    Under torchrun the other nodes then wait five minutes at their exit barrier and fail too.

    A crash in native code (a segfault, an abort) prints every thread's Python stack first."""
    faulthandler.enable(all_threads=True)
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = _exit_status(exit_.code)
    except BaseException as err:  # noqa: B036 -- reported as the interpreter would, with its status
        if _peer_stopped(err):
            # A collective this rank waited in failed because another rank stopped (bad input it
            # reported in one line, a crash with its own traceback): that rank's output says why.
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: a collective failed: another rank stopped first (its output says why): "
                      f"{str(err).splitlines()[0][:200]}", file=sys.stderr, flush=True)
            # The launcher reports the status of the first rank it sees exit (DeepSpeed's polls
            # every second): outlive the rank that stopped, so its status (2 for bad input) is
            # the run's, not this rank's 1. The launcher kills this rank once it has seen that.
            time.sleep(PEER_STOPPED_GRACE_S)
        else:
            sys.excepthook(*sys.exc_info())
        status = 128 + signal.SIGINT if isinstance(err, KeyboardInterrupt) else 1
    # What the interpreter does at exit before its teardown, in its order: stop the thread pools
    # (concurrent.futures' exit hooks) and wait for non-daemon threads, then run the exit handlers.
    threading._shutdown()
    atexit._run_exitfuncs()
    _flush_open_files()
    os._exit(status)


def _flush_open_files():
    """Flush every file object still open, as teardown would when it frees them: a buffered
    file that a stage left open would otherwise lose its last writes to os._exit."""
    # exact types: isinstance would ask every object for its __class__, and some (deprecated
    # torch attributes) warn when asked
    kinds = (io.FileIO, io.BufferedWriter, io.BufferedRandom, io.TextIOWrapper)
    for obj in gc.get_objects():
        if type(obj) in kinds:
            try:
                if not obj.closed:
                    obj.flush()
            except (OSError, ValueError):  # a closed pipe, a detached buffer: nothing to keep
                pass


# What gloo and NCCL say when a peer's connections close under a collective.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _peer_stopped(err):
    """Whether `err` is a collective failing because another rank of a multi-rank run stopped."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(s in str(err) for s in _PEER_GONE))


def _exit_status(code):
    """The status `sys.exit(code)` gives: None is 0, an int itself, anything else is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
