"""What the benchmark scripts share: the child-process protocol (a child prints tagged JSON
results and progress notes on stdout, everything else goes to a log), running a child in its
own process group with a timeout, and a wall/CPU meter of one run.

Each script runs as ``python benchmarks/<name>.py``, so this module is importable as
``_harness`` (the script's directory is first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RESULT_TAG", "NOTE_TAG", "emit", "note", "kill_group", "run_child", "Meter"]

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "@@BENCH_RESULT@@ "
NOTE_TAG = "@@BENCH_NOTE@@ "


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
    """Wall time of one run, the CPU time the child's session used (every process of it: Ray,
    JVMs, Python) and the CPU time everything else on the machine used meanwhile (noise).
    CPU figures need Linux /proc; elsewhere they are None."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.wall = 0.0
        self.cpu: float | None = None
        self.other_pct: float | None = None

    def _snap(self) -> tuple[float, float | None, float | None]:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = sum(v[:3]) + sum(v[5:7])  # user nice system + irq softirq (not idle/iowait)
            sid, ours = os.getsid(0), 0
            for d in os.listdir("/proc"):
                if not d.isdigit():
                    continue
                try:
                    with open(f"/proc/{d}/stat") as f:
                        rest = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(rest[3]) == sid:  # utime stime cutime cstime (reaped children included)
                    ours += sum(int(x) for x in rest[11:15])
            return time.perf_counter(), busy / self.tick, ours / self.tick
        except (OSError, ValueError, IndexError):
            return time.perf_counter(), None, None

    def __enter__(self) -> Meter:
        self.t0, self.b0, self.o0 = self._snap()
        return self

    def __exit__(self, *exc: Any) -> None:
        t1, b1, o1 = self._snap()
        self.wall = t1 - self.t0
        self.cpu = self.other_pct = None
        if None not in (self.b0, b1, self.o0, o1):
            self.cpu = o1 - self.o0
            other = max(0.0, (b1 - self.b0) - self.cpu)
            self.other_pct = 100 * other / (self.wall * (os.cpu_count() or 1))
            if self.cpu < 0:  # a process of the session exited unreaped: its CPU time is lost
                self.cpu = None

    def record(self, r: dict[str, Any]) -> str:
        """Append this run's figures to a result's lists; returns a one-line summary."""
        r["times"].append(self.wall)
        r.setdefault("cpu", []).append(self.cpu)
        r.setdefault("other_pct", []).append(self.other_pct)
        if self.cpu is None:
            return f"{self.wall:.1f}s"
        return f"{self.wall:.1f}s, cpu {self.cpu:.0f}s, others {self.other_pct:.0f}% of the machine"
