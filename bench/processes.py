"""Conveyor's web and worker processes for a benchmark, and a sampler of their memory.

They are started the way ``conveyor run`` starts them (``shared.cli.web_command`` and
``worker_command``), each in its own session so it can be stopped by its process group,
with the bench's service URLs and a state folder of its own in the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
# Our own choices for the children, and the tuning knobs a reader of the benchmark may
# want to compare (CONVEYOR_IMPORT_WRITERS=1, CONVEYOR_UPLOAD_COMPRESSION=identity); anything
# else named CONVEYOR_* in the caller's environment (a fault point, a port) would make
# the measurement something else.
_OURS = (
    "CONVEYOR_STATE_DIR",
    "CONVEYOR_ENV",
    "CONVEYOR_IMPORT_WRITERS",
    "CONVEYOR_UPLOAD_COMPRESSION",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(settings: Settings) -> dict[str, str]:
    env = settings.child_env()
    return {k: v for k, v in env.items() if not k.startswith("CONVEYOR_") or k in _OURS}


class Child:
    """One started command (a web server or celery master and the processes it forks)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stopped as one, never by name
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The master and all its descendants (prefork children, web server workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the group (a warm shutdown), SIGKILL it if it outlives ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # The master is gone; a child that outlived it in the group is ours to end too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def wait_http_ok(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(url, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} did not answer {url} within {timeout}s:\n{child.log_tail()}")


def wait_log(child: Child, needle: bytes, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        if needle in child.log_path.read_bytes():
            return
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not ready within {timeout}s:\n{child.log_tail()}")


@dataclass
class GroupPeak:
    """Peak resident memory of a group of process trees (all web, or all workers)."""

    tree_mb: float = 0.0  # the largest single tree: a master and its children, summed
    process_mb: float = 0.0  # the largest single process, master or child
    process_name: str = ""
    # The largest process below a master: a web server worker, a Celery pool process (and
    # whatever it starts). These handle the data; a master's size does not depend on it.
    child_mb: float = 0.0
    processes: int = 0  # most processes seen at once in the group
    per_process: dict[str, float] = field(default_factory=dict)  # "name:pid:role" → peak MB

    def add(self, label: str, rss: float, *, child: bool) -> None:
        self.per_process[label] = max(self.per_process.get(label, 0.0), rss)
        if rss > self.process_mb:
            self.process_mb, self.process_name = rss, label
        if child:
            self.child_mb = max(self.child_mb, rss)

    def as_dict(self) -> dict[str, object]:
        top = sorted(self.per_process.items(), key=lambda kv: -kv[1])[:8]
        return {
            "peak_tree_rss_mb": round(self.tree_mb, 1),
            "peak_process_rss_mb": round(self.process_mb, 1),
            "peak_process": self.process_name,
            "peak_child_rss_mb": round(self.child_mb, 1),
            "processes": self.processes,
            "per_process_peak_mb": {k: round(v, 1) for k, v in top},
        }


@dataclass
class RssSampler:
    """Samples RSS and CPU time of named groups of processes every ``interval`` s, in a thread.

    ``groups`` maps a name to the started children whose trees form it; ``extra`` maps a
    name to a function listing more pids (the PostgreSQL backends serving the benchmark's
    database), sampled for CPU only. RSS counts pages shared after fork in every process
    that maps them, so a tree's sum overstates what the tree costs; the per-process peak
    is the figure the targets use. CPU time is what each process used while the sampler
    ran (a process first seen later counts from its start: a new backend, say).
    """

    groups: dict[str, list[Child]]
    extra: dict[str, Callable[[], list[int]]] = field(default_factory=dict)
    interval: float = 0.1
    peaks: dict[str, GroupPeak] = field(default_factory=dict)
    samples: int = 0
    seconds: float = 0.0
    _cpu_start: dict[int, float] = field(default_factory=dict)
    _cpu_last: dict[str, dict[int, float]] = field(default_factory=dict)
    _roles: dict[int, str] = field(default_factory=dict)  # pid → "master" | "child"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = 0.0

    def __post_init__(self) -> None:
        self.peaks = {name: GroupPeak() for name in self.groups}
        self._cpu_last = {name: {} for name in (*self.groups, *self.extra)}

    def _cpu(self, group: str, proc: psutil.Process, role: str = "") -> None:
        times = proc.cpu_times()
        used = times.user + times.system
        if self.samples == 0:
            self._cpu_start[proc.pid] = used
        self._cpu_last[group][proc.pid] = used
        if role:
            self._roles[proc.pid] = role

    def _sample(self) -> None:
        for name, children in self.groups.items():
            peak = self.peaks[name]
            count = 0
            for child in children:
                total = 0.0
                for proc in child.tree():
                    master = proc.pid == child.proc.pid
                    try:
                        rss = proc.memory_info().rss / MB
                        role = "master" if master else "child"
                        label = f"{child.name}:{proc.pid}:{role}"
                        self._cpu(name, proc, role)
                    except psutil.Error:
                        continue
                    count += 1
                    total += rss
                    peak.add(label, rss, child=not master)
                peak.tree_mb = max(peak.tree_mb, total)
            peak.processes = max(peak.processes, count)
        for name, pids in self.extra.items():
            with contextlib.suppress(Exception):  # a lost connection costs a sample, no more
                for pid in pids():
                    with contextlib.suppress(psutil.Error):
                        self._cpu(name, psutil.Process(pid))
        self.samples += 1

    def cpu_seconds(self, *, by_role: bool = False) -> dict[str, float]:
        """CPU seconds (user + system) each group used while sampled.

        ``by_role``: a group of started children is split into its masters and the
        processes they forked ("worker master", "worker child"; a web server's workers).
        """
        used: dict[str, float] = {}
        for name, last in self._cpu_last.items():
            for pid, value in last.items():
                role = self._roles.get(pid, "") if by_role else ""
                key = f"{name} {role}" if role else name
                used[key] = used.get(key, 0.0) + value - self._cpu_start.get(pid, 0.0)
        for name in self._cpu_last:  # a group that showed no process still answers 0
            if not by_role or name not in self.groups:
                used.setdefault(name, 0.0)
        return {key: round(value, 3) for key, value in used.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)
        self._sample()

    def __enter__(self) -> RssSampler:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.monotonic() - self._started
