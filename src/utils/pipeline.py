"""Drivers that chain stages (the quickstart, online EXO): each stage a launcher or entry-point
command, skipped when it finished before from the same inputs, resumed when it was killed.

A stage is *done* when WORKDIR/stages/NAME.json, its record (utils/provenance.py), says it was
made from what it would be made from now: its settings, the digests of its input files and of
the outputs of the stages it depends on as they are on disk now, and that its own outputs are
still the files it wrote. Everything is checked from the files when the stage is about to be
skipped, so a stage whose input was redone by an earlier run (a round redone under fewer
`--rounds`, a model retrained in place) is redone too, and a damaged record (a crash or a full
disk while it was written) counts as not done: the stage is redone, with the reason on its line.

When a stage starts, WORKDIR/stages/NAME.started.json records what it is made from, so that a
rerun of a killed stage with the same inputs keeps its partial output (the entry points resume
from it: sharded inference from its shards, training with `--resume auto`), while a rerun with
other inputs starts it clean. When a stage is redone, every stage that depends on it, directly
or not, loses its record and outputs at once.

Each command runs in its own process group, recorded in WORKDIR/logs/NAME.pgid while it runs,
so that a driver killed outright (SIGKILL, which it cannot catch) is cleaned up by the next
run: it kills a recorded group that is still alive before it starts anything (and refuses to
start while the driver that recorded it still runs: one driver per directory).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import provenance
from .fileio import InputError, atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]

_PROGRESS = re.compile(r"\d+%\|")  # a tqdm bar
_NOT_PROGRESS = ("Loading weights", "Writing model shards")  # sub-second bars of transformers


class StageFailed(Exception):
    pass


def _start_time(pid):
    """The kernel's start time of `pid` (None if it is gone or unknown): a recorded pid names
    the same process only while this matches."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def kill_stale_group(pgid_file):
    """Kill the process group recorded in `pgid_file` if it still runs (left by a driver that
    was killed while the command ran); remove the file. Returns whether a group was killed.
    While the driver that started it lives, the group is another run's: an InputError."""
    try:
        recorded = json.loads(Path(pgid_file).read_text())
    except (OSError, ValueError):
        return False
    driver = recorded.get("driver")
    if driver is not None and driver != os.getpid() and _start_time(driver) == recorded.get("driver_start") \
            and _start_time(driver) is not None:
        raise InputError(f"{pgid_file}: another run (pid {driver}) is running this stage in the same directory; "
                         "wait for it or stop it first")
    Path(pgid_file).unlink(missing_ok=True)
    pgid, start = recorded.get("pgid"), recorded.get("start")
    leader_start = _start_time(pgid)
    if leader_start is not None and leader_start != start:
        return False  # the pid was reused by an unrelated process
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    for _ in range(100):  # until the group is gone, so nothing it writes races the rerun
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return True


def run_command(cmd, log_path, env=None):
    """Run `cmd` from the repo root with its output appended to `log_path`, showing the latest
    progress bar it prints.

    The command gets its own process group, killed whole on failure or Ctrl-C (the deepspeed
    launcher does not take its ranks down with it) and recorded in LOG_PATH minus .log plus
    .pgid while it runs (see kill_stale_group)."""
    tty = sys.stdout.isatty()
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    pgid_file = Path(log_path).with_suffix(".pgid")
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        log.flush()
        process = subprocess.Popen([str(c) for c in cmd], cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        atomic_write_json(pgid_file, {"pgid": process.pid, "start": _start_time(process.pid),
                                      "driver": os.getpid(), "driver_start": _start_time(os.getpid())})
        last_shown, pending = time.monotonic(), b""
        try:
            for chunk in iter(lambda: process.stdout.read1(4096), b""):
                log.write(chunk)
                pending += chunk
                *segments, pending = re.split(rb"[\r\n]", pending)
                bars = [s.decode(errors="replace") for s in segments]
                bars = [s for s in bars if _PROGRESS.search(s) and not s.lstrip().startswith(_NOT_PROGRESS)]
                now = time.monotonic()
                # on a terminal the bar is redrawn in place; in a log (CI) one line every 20 s
                if bars and (tty or now - last_shown > 20):
                    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", bars[-1]).strip()  # tqdm's cursor moves
                    width = shutil.get_terminal_size().columns - 5
                    print(f"\r    {text[:width]}\033[K" if tty else f"    {text}", end="" if tty else "\n", flush=True)
                    last_shown = now
            process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        finally:
            pgid_file.unlink(missing_ok=True)
            if tty:
                print("\r\033[K", end="", flush=True)
    if process.returncode != 0:
        tail = Path(log_path).read_text(errors="replace").replace("\r", "\n").splitlines()[-25:]
        raise StageFailed("\n".join(["    " + line for line in tail]) +
                          f"\n  exit code {process.returncode}; the whole output is in {log_path}")


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Pipeline:
    """Stages in order, each with the stages it depends on, the settings that shape its output,
    the files it reads besides those stages' outputs and the paths it writes (see the module
    docstring for when a stage runs)."""

    def __init__(self, workdir, force):
        self.workdir = Path(workdir)
        self.force = force
        self.stages = []
        self.redone = set()

    def stage(self, name, description, deps, settings, outputs, run, always=False, inputs=()):
        """Add a stage; `run(log_path)` does its work, `settings` must be JSON (compared as such);
        `inputs` are files or directories it reads that no stage writes (a model, the data)."""
        if any(s["name"] == name for s in self.stages):
            raise ValueError(f"stage {name} added twice")
        settings = json.loads(json.dumps(settings))  # as it reads back from its record (tuples become lists)
        self.stages.append(dict(name=name, description=description, deps=deps, settings=settings,
                                outputs=[Path(p) for p in outputs], run=run, always=always,
                                inputs=[Path(p) for p in inputs]))

    def marker(self, name, kind="done"):
        return self.workdir / "stages" / (f"{name}.json" if kind == "done" else f"{name}.{kind}.json")

    def made_from(self, stage):
        """What `stage` would be made from now: its settings and the digests of what it reads."""
        by_name = {s["name"]: s for s in self.stages}
        inputs = {dep: [provenance.digest(p) for p in by_name[dep]["outputs"]] for dep in stage["deps"]}
        inputs.update({str(p): provenance.digest(p) for p in stage["inputs"]})
        return {"settings": stage["settings"], "inputs": inputs}

    def dependents(self, name):
        """Every later stage whose inputs come, directly or not, from stage `name`."""
        found = {name}
        for stage in self.stages:
            if any(dep in found for dep in stage["deps"]):
                found.add(stage["name"])
        return [s for s in self.stages if s["name"] in found and s["name"] != name]

    def check_force(self):
        known = {s["name"] for s in self.stages}
        unknown = [name for name in self.force or () if name not in known]
        if unknown:
            raise InputError(f"--force {' '.join(unknown)}: no such stage; stages: {', '.join(sorted(known))}")

    def _clean(self, stage):
        for kind in ("done", "started"):
            self.marker(stage["name"], kind).unlink(missing_ok=True)
        for path in stage["outputs"]:
            _remove(path)

    def _started_with(self, name):
        try:
            return json.loads(self.marker(name, "started").read_text())
        except (OSError, ValueError):  # none, or cut short: the stage starts clean
            return None

    def run(self):
        self.check_force()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for pgid_file in sorted(logs.glob("*.pgid")):
            if kill_stale_group(pgid_file):
                print(f"killed what was left running of stage {pgid_file.stem} by a driver that was killed",
                      flush=True)
        started = time.monotonic()
        for number, stage in enumerate(self.stages, start=1):
            name = stage["name"]
            made_from = self.made_from(stage)
            reason, clean = None, True
            if stage["always"]:
                reason = "every run"
            elif self.force is not None and (not self.force or name in self.force):
                reason = "forced"
            elif any(dep in self.redone for dep in stage["deps"]):
                reason = "its inputs were redone"
            else:
                reason = provenance.why_not_reusable(self.marker(name), made_from, stage["outputs"])
                if reason == "not done yet" and self._started_with(name) == made_from:
                    reason, clean = "interrupted before, resuming", False  # the entry points resume
            header = f"[{number}/{len(self.stages)}] {name}: {stage['description']}"
            if reason is None:
                print(f"{header} -- done before, skipped", flush=True)
                continue
            print(f"{header} ({reason})", flush=True)
            for dependent in self.dependents(name):
                self._clean(dependent)
            if clean:
                self._clean(stage)
            else:
                self.marker(name).unlink(missing_ok=True)
            atomic_write_json(self.marker(name, "started"), made_from)
            stage_started = time.monotonic()
            stage["run"](logs / f"{name}.log")
            if not stage["always"]:
                provenance.write_record(self.marker(name), made_from, stage["outputs"])
            self.redone.add(name)
            print(f"    done in {time.monotonic() - stage_started:.0f} s", flush=True)
        return time.monotonic() - started


def run_or_exit(pipe):
    """A driver's `pipe.run()`: the seconds it took, or, when a stage failed, its last lines on
    stderr and exit code 1."""
    try:
        return pipe.run()
    except StageFailed as err:
        print(f"error: the stage failed; its last lines:\n{err}", file=sys.stderr)
        sys.exit(1)
