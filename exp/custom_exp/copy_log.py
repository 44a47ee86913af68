"""Copy a run's console (stdin) to the terminal and append it to LOG; used by common.sh.

    ... 2>&1 | python -u exp/custom_exp/copy_log.py OUTPUT_DIR/training.log

- The terminal gets everything as it comes, progress-bar redraws included.
- LOG gets whole lines, each as it last looked (a progress bar's final redraw, a step line
  without the bar it cleared), and only once LOG's directory exists: the stage creates it when
  its input has been checked, so a run stopped by bad input leaves no directory behind. Lines
  from before are kept and written first.
- The deepspeed launcher's closing line when a rank fails repeats the rank's whole command
  line (~2 KB); it is cut to its return code, and dropped for code 2 (bad input), whose one
  `error:` line the rank has already printed.
"""
import os
import re
import sys

LAUNCHER_FAILURE = re.compile(rb"^(.*\[launch\.py:\d+:sigkill_handler\] ).* exits with return code = (-?\d+)\s*$")
INPUT_ERROR_EXIT_CODE = b"2"


def shorten(line):
    """The launcher's failure line cut to its code, or None to drop it; other lines unchanged."""
    failure = LAUNCHER_FAILURE.match(line)
    if not failure:
        return line
    if failure.group(2) == INPUT_ERROR_EXIT_CODE:
        return None
    return failure.group(1) + b"a rank exited with return code = " + failure.group(2)


def main(log_path):
    log_dir = os.path.dirname(os.path.abspath(log_path))
    log, waiting, partial, sent = None, [], b"", 0  # sent: bytes of `partial` already on the terminal
    while True:
        chunk = os.read(0, 1 << 16)
        lines = (partial + chunk).split(b"\n")
        partial = lines.pop() if chunk else b""
        if lines and not chunk and lines[-1] == b"":
            lines.pop()
        out = []
        for i, line in enumerate(lines):
            already = sent if i == 0 else 0
            line = shorten(line) if already == 0 else line
            if line is not None:
                out.append(line[already:] + b"\n")
                waiting.append(line.rsplit(b"\r", 1)[-1])
        out.append(partial[sent if not lines else 0:])  # a live progress bar shows as it is drawn
        sent = len(partial)
        sys.stdout.buffer.write(b"".join(out))
        sys.stdout.buffer.flush()
        if log is None and os.path.isdir(log_dir):
            log = open(log_path, "ab")
        if log is not None and waiting:
            log.write(b"".join(line + b"\n" for line in waiting))
            log.flush()
            waiting = []
        if not chunk:
            break


if __name__ == "__main__":
    main(sys.argv[1])
