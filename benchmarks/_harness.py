"""What the benchmark scripts share: the child-process protocol (a child prints tagged JSON
results and progress notes on stdout, everything else goes to a log), running a child in its
own process group with a timeout, and a wall/CPU meter of one run.

Each script runs as ``python benchmarks/<name>.py``, so this module is importable as
``_harness`` (the script's directory is first on ``sys.path``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "RESULT_TAG",
    "NOTE_TAG",
    "setup_child_logging",
    "emit",
    "note",
    "kill_group",
    "run_child",
    "Meter",
]

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "@@BENCH_RESULT@@ "
NOTE_TAG = "@@BENCH_NOTE@@ "


def setup_child_logging() -> None:
    """A child's log format (its stderr goes to the run's log file), without the chatty
    loggers."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("py4j", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def emit(result: dict[str, Any]) -> None:
    """Child -> parent: one JSON line on stdout."""
    print(RESULT_TAG + json.dumps(result, default=str), flush=True)


def note(msg: str) -> None:
    """Child -> parent: a progress line (relayed by the parent)."""
    print(NOTE_TAG + msg, flush=True)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """Stop a child and what it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def run_child(
    args: list[str], log_path: Path, timeout: float, label: str, append: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Run ``python <args>`` in its own process group on a private Ray (no RAY_ADDRESS).

    Results (``emit``) are collected, notes (``note``) printed, all other output goes to
    ``log_path``. On a timeout the child and everything it started are stopped. When the child
    fails, the log's last lines are printed.

    Returns:
        The results the child emitted, and its exit code.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("RAY_ADDRESS", None)  # a private local Ray instance, never a shared cluster
    results: list[dict[str, Any]] = []
    with open(log_path, "a" if append else "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )

        def relay() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    results.append(json.loads(line[len(RESULT_TAG) :]))
                elif line.startswith(NOTE_TAG):
                    print(line[len(NOTE_TAG) :].rstrip(), flush=True)
                else:  # JVM / library chatter on stdout
                    log.write(line)
                    log.flush()

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"!! {label}: timed out after {timeout:.0f}s; stopping it", flush=True)
            kill_group(proc)
        except KeyboardInterrupt:
            kill_group(proc)
            raise
        reader.join(timeout=10)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        print(f"!! {label} exited with {proc.returncode}; last lines of {log_path}:", flush=True)
        for t in tail:
            print("   " + t)
    return results, proc.returncode


class Meter:
    """Wall time of one run, CPU seconds of the child's session (the child and every process it
    started: Ray's GCS/raylet/workers, JVMs, TensorFlow) and CPU the rest of the machine used
    meanwhile, as % of all cores (noise). CPU figures need Linux /proc; elsewhere they are None.

    The session's processes are sampled every 0.2 s while the meter runs, each one's last seen
    CPU kept: Ray (Train, Data, RayDP) starts and ends processes during a run, and a snapshot at
    the end alone would count the CPU of those that exited as the rest of the machine's."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.wall = 0.0
        self.cpu: float | None = None
        self.other_pct: float | None = None
        self._first: dict[tuple[int, int], int] = {}  # (pid, start time) -> CPU ticks
        self._last: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._ok = True
        self._sampling_started = False

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:3]) + sum(v[5:7])  # user nice system + irq softirq (not idle/iowait)

    def _sample(self) -> None:
        sid = os.getsid(0)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(rest[3]) != sid:
                continue
            key = (int(d), int(rest[19]))  # pid, start time: pids get reused
            ticks = int(rest[11]) + int(rest[12])  # utime + stime (children are sampled too)
            self._first.setdefault(key, ticks if self._sampling_started else 0)
            self._last[key] = ticks

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._sample()
            except (OSError, ValueError, IndexError):
                self._ok = False

    def __enter__(self) -> Meter:
        self.t0 = time.perf_counter()
        try:
            self._sampling_started = True  # processes alive now: count from their current CPU
            self._sample()
            self._sampling_started = False  # processes seen later: count from 0
            self.b0: int | None = self._busy()
        except (OSError, ValueError, IndexError):
            self.b0 = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        try:
            self._sample()
            b1 = self._busy()
        except (OSError, ValueError, IndexError):
            return
        if self.b0 is None or not self._ok:
            return
        self.cpu = sum(t - self._first[k] for k, t in self._last.items()) / self.tick
        other = max(0.0, (b1 - self.b0) / self.tick - self.cpu)
        self.other_pct = 100 * other / (self.wall * (os.cpu_count() or 1))

    def record(self, r: dict[str, Any]) -> str:
        """Append this run's figures to a result's lists; returns a one-line summary."""
        r["times"].append(self.wall)
        r.setdefault("cpu", []).append(self.cpu)
        r.setdefault("other_pct", []).append(self.other_pct)
        if self.cpu is None:
            return f"{self.wall:.1f}s"
        return f"{self.wall:.1f}s, cpu {self.cpu:.0f}s, others {self.other_pct:.0f}% of the machine"
