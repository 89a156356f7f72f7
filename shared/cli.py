"""The ``conveyor`` command: starts every process, manages tokens and checks a deployment.

``conveyor run`` is a small process supervisor for one machine: it starts the embedded
PostgreSQL and Redis when ``DATABASE_URL``/``REDIS_URL`` are unset, migrates, makes the
first admin token, then runs web (granian or gunicorn), a worker, beat, Flower and the Prometheus
exporter as children and restarts any that dies. ``conveyor web|worker|beat|flower|exporter``
run one of them in the foreground (exec), for compose files and process managers.

This module never imports ``web`` or ``worker``: they are started as processes, the way a
process manager would, and everything heavier than click is imported inside the command
that needs it, so ``conveyor --help`` answers at once. It is the only module that prints.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from shared.settings import Settings

log = logging.getLogger("conveyor.supervisor")

QUEUES = "default,imports,deployments"  # shared.queue.QUEUES, without importing Celery
WORKER_HOSTNAME = "conveyor@%h"
FINISHED = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

# Restart delays for a child that keeps dying: 1 s, 2 s, 4 s ... capped; a child that ran
# this long before it died counts as healthy again and restarts after 1 s.
BACKOFF_CAP_S = 30.0
STABLE_AFTER_S = 60.0
# How long each child gets between SIGTERM and SIGKILL. gunicorn drains requests (its own
# --graceful-timeout is shorter); a Celery worker finishes running tasks (warm shutdown),
# and a task cut short is redelivered anyway (acks_late), so the wait is bounded.
STOP_TIMEOUT_S = {"web": 15.0, "flower": 5.0, "beat": 5.0, "worker": 25.0, "exporter": 5.0}
STOP_ORDER = ("web", "flower", "beat", "worker", "exporter")
# Flower forgets a worker that has been offline this long (a scaled-down or renamed one).
FLOWER_PURGE_OFFLINE_S = "600"


# --- settings and services ------------------------------------------------------------------


def _load_settings() -> Settings:
    """Settings from the environment; a bad value is a clear error, never a traceback."""
    from pydantic import ValidationError

    from shared.settings import load_settings

    try:
        return load_settings()
    except ValidationError as exc:
        # Only location and message: pydantic's own text repeats the input, secrets included.
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise click.ClickException("invalid settings:\n" + "\n".join(lines)) from None


def _with_urls(settings: Settings, database_url: str | None, redis_url: str | None) -> Settings:
    update = {"database_url": database_url, "redis_url": redis_url}
    return settings.model_copy(update={k: v for k, v in update.items() if v is not None})


def _lock_is_held(path: Path) -> bool:
    """True if another process holds the flock the embedded launcher keeps on ``path``."""
    try:
        f = path.open("r")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _read_port(path: Path) -> int | None:
    try:
        port = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 else None


def running_embedded(state_dir: Path) -> tuple[str | None, str | None]:
    """URLs of embedded servers another launcher (a ``conveyor run``) runs for ``state_dir``.

    The launcher holds a flock on ``<state>/postgres.lock`` / ``redis.lock`` while its
    server runs and records the port in ``pg.port`` / ``redis.port``.
    """
    database_url = redis_url = None
    if _lock_is_held(state_dir / "postgres.lock"):
        port = _read_port(state_dir / "pg.port")
        if port:
            from shared.embedded import postgres_url

            database_url = postgres_url(state_dir, port)
    if _lock_is_held(state_dir / "redis.lock"):
        port = _read_port(state_dir / "redis.port")
        if port:
            redis_url = f"redis://127.0.0.1:{port}/0"
    return database_url, redis_url


@contextlib.contextmanager
def _services(
    settings: Settings,
    *,
    postgres: bool,
    redis: bool,
    join: bool = True,
    started: list[Any] | None = None,
) -> Iterator[Settings]:
    """Settings whose URLs point at running servers, starting embedded ones if needed.

    A URL that is set is used as is. An unset one is taken from a running ``conveyor run``
    on the same state folder (with ``join``), or its server is started here for the
    duration of the block.
    """
    need_pg = postgres and not settings.database_url
    need_redis = redis and not settings.redis_url
    if not (need_pg or need_redis):
        yield settings
        return
    running_pg, running_redis = running_embedded(settings.state_dir) if join else (None, None)
    if need_pg and running_pg:
        settings, need_pg = _with_urls(settings, running_pg, None), False
    if need_redis and running_redis:
        settings, need_redis = _with_urls(settings, None, running_redis), False
    if not (need_pg or need_redis):
        yield settings
        return
    from shared.embedded import EmbeddedServices, LauncherError

    services = EmbeddedServices(
        settings.state_dir,
        postgres=need_pg,
        redis=need_redis,
        pg_port=settings.embedded_pg_port,
        redis_port=settings.embedded_redis_port,
        service_user=settings.embedded_pg_user,
    )
    try:
        services.start()
    except LauncherError as exc:
        raise click.ClickException(f"cannot start the embedded services: {exc}") from None
    if started is not None:
        started.extend(services.servers)  # for `conveyor run` to watch and restart
    try:
        yield _with_urls(settings, services.database_url, services.redis_url)
    finally:
        services.stop()


def _require_urls(settings: Settings, *, postgres: bool, redis: bool, what: str) -> Settings:
    """For exec-style commands: URLs from settings or a running ``conveyor run``, else fail."""
    running_pg, running_redis = running_embedded(settings.state_dir)
    if postgres and not settings.database_url:
        settings = _with_urls(settings, running_pg, None)
    if redis and not settings.redis_url:
        settings = _with_urls(settings, None, running_redis)
    missing = [
        name
        for name, needed, value in (
            ("DATABASE_URL", postgres, settings.database_url),
            ("REDIS_URL", redis, settings.redis_url),
        )
        if needed and not value
    ]
    if missing:
        raise click.ClickException(
            f"`conveyor {what}` needs {' and '.join(missing)}: set "
            f"{'them' if len(missing) > 1 else 'it'}, or start `conveyor run` (which starts "
            f"embedded servers for {settings.state_dir}) and this command joins it."
        )
    return settings


def _safe_url(url: str) -> str:
    """``scheme://host:port/path`` without credentials or driver, for printing."""
    parts = urllib.parse.urlsplit(url.replace("+psycopg2", ""))
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- child commands -----------------------------------------------------------------------


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def web_command(
    settings: Settings,
    *,
    workers: int | None = None,
    threads: int | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The API server (``settings.web_server``) serving ``web.wsgi:app``.

    granian (``web.granian_server``) by default; gunicorn with threaded workers when
    chosen. ``extra`` goes to gunicorn only.
    """
    if settings.web_server == "granian":
        if extra:
            raise click.UsageError("extra server arguments are for gunicorn only")
        argv = [sys.executable, "-m", "web.granian_server", "--host", settings.web_host]
        argv += ["--port", str(settings.web_port)]
        argv += ["--workers", str(workers)] if workers else []
        argv += ["--threads", str(threads)] if threads else []
        return argv
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "web.wsgi:app",
        "--bind",
        _bind(settings.web_host, settings.web_port),
        "--workers",
        str(workers or settings.web_workers),
        "--threads",
        str(threads or settings.web_threads),
        "--worker-class",
        "gthread",
        # Shorter than the supervisor's wait for web, so in-flight requests finish first.
        "--graceful-timeout",
        "10",
        # Its default control socket is one path per home folder, which two instances on a
        # host would fight over; Conveyor drives gunicorn by signals only.
        "--no-control-socket",
        "--logger-class",
        "web.gunicorn_logging.JsonLogger",
        # Server hooks for prometheus-client's multiprocess mode (web/metrics.py).
        "--config",
        "python:web.metrics",
        *extra,
    ]


def worker_command(
    settings: Settings,
    *,
    queues: str = QUEUES,
    concurrency: int | None = None,
    hostname: str = WORKER_HOSTNAME,
    extra: Sequence[str] = (),
) -> list[str]:
    """A Celery worker consuming ``queues``, sending task events (``-E``) for Flower."""
    return [
        sys.executable,
        "-m",
        "celery",
        "--quiet",  # no banner: every line on stderr is JSON
        "-A",
        "worker.celery_app",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency or settings.worker_concurrency),
        "-E",
        "-n",
        hostname,
        "-l",
        settings.log_level.upper(),
        *extra,
    ]


def beat_command(settings: Settings, *, extra: Sequence[str] = ()) -> list[str]:
    """Celery beat with its schedule file in the state folder."""
    schedule = settings.state_dir.resolve() / "celerybeat-schedule"
    return [
        sys.executable,
        "-m",
        "celery",
        "--quiet",
        "-A",
        "worker.celery_app",
        "beat",
        "-s",
        str(schedule),
        "-l",
        settings.log_level.upper(),
        *extra,
    ]


def flower_command(settings: Settings, *, extra: Sequence[str] = ()) -> list[str]:
    """Flower on its address and port; its credentials travel in the environment."""
    return [
        sys.executable,
        "-m",
        "worker.flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        *extra,
    ]


def exporter_command(settings: Settings, *, extra: Sequence[str] = ()) -> list[str]:
    """The Prometheus exporter (Celery events, queue lengths, workers' figures)."""
    return [sys.executable, "-m", "worker.exporter", *extra]


def flower_env(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """``env`` plus Flower's basic auth, which must never be in argv (``ps`` shows argv).

    Flower reads every option from a ``FLOWER_<NAME>`` variable too; ``basic_auth`` is a
    list split on commas, so neither part may contain one.
    """
    user, password = settings.flower_user, settings.secret("flower_password")
    if "," in user or ":" in user or "," in password:
        raise click.ClickException(
            "CONVEYOR_FLOWER_USER may contain neither ',' nor ':', and "
            "CONVEYOR_FLOWER_PASSWORD no ',' (Flower splits its credentials on them)"
        )
    env = dict(env)
    env["FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    env.setdefault("FLOWER_PURGE_OFFLINE_WORKERS", FLOWER_PURGE_OFFLINE_S)
    return env


def _exec(argv: list[str], env: dict[str, str]) -> NoReturn:
    """Replace this process with ``argv``: signals and exit codes belong to the server."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # noqa: S606 - an argument list, never a shell string


# --- the supervisor -----------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


@functools.cache
def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn giving the child SIGTERM when we die, even by SIGKILL (Linux).

    Without it a killed supervisor would leave web, worker, beat and Flower running,
    holding their ports and retrying a database that died with us. The signal fires when
    the spawning thread exits, so children are started from the main thread.
    """
    name = ctypes.util.find_library("c")
    prctl = getattr(ctypes.CDLL(name, use_errno=True), "prctl", None) if name else None
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@dataclass
class Child:
    """One supervised process, in its own process group."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0  # consecutive quick deaths, for the backoff
    restarts: int = 0
    restart_at: float | None = None

    def start(self) -> None:
        # Its own process group: a terminal's Ctrl-C reaches only the supervisor, which
        # stops the children in order; gunicorn/Celery workers share their master's group.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            process_group=0,
            # Only prctl, getppid and kill run in the child: nothing that takes a lock.
            preexec_fn=_die_with_parent(),  # noqa: PLW1509
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    def stop(self, timeout: float, hurry: threading.Event) -> int | None:
        """SIGTERM the main process, wait up to ``timeout``, then SIGKILL the whole group."""
        proc, self.proc = self.proc, None
        self.restart_at = None
        if proc is None:
            return None
        if proc.poll() is None:
            # The master only: it stops its own workers gracefully (gunicorn, Celery).
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline and not hurry.is_set():
                time.sleep(0.05)
            if proc.poll() is None:
                log.warning(
                    "child did not stop in time; killing it",
                    extra={"child": self.name, "pid": proc.pid, "timeout_s": timeout},
                )
        # Also reaps leftovers of a clean exit (an orphaned prefork child, say).
        _kill_group(proc.pid)
        return proc.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class ServerWatch:
    """An embedded PostgreSQL or Redis the supervisor restarts if it dies."""

    server: Any  # shared.embedded.EmbeddedPostgres | EmbeddedRedis (imported lazily)
    started_at: float = field(default_factory=time.monotonic)
    failures: int = 0
    restarts: int = 0
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return str(self.server.NAME)


def _backoff(failures: int) -> float:
    return float(min(BACKOFF_CAP_S, 2.0**failures))


@dataclass
class Supervisor:
    """Starts children, restarts the ones that die with backoff, stops them in order.

    Embedded servers are watched too: one that dies is started again on the same data
    and, when the port is still free, the same port, so the other children's URLs hold.
    """

    children: list[Child]
    servers: list[ServerWatch] = field(default_factory=list)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    hurry: threading.Event = field(default_factory=threading.Event)
    signals: list[int] = field(default_factory=list)

    def request_stop(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: the first signal stops in order, a second one kills at once."""
        # Only flags here: logging from a handler could re-enter a half-done stderr write.
        if self.stop_requested.is_set():
            self.hurry.set()
        self.signals.append(signum)
        self.stop_requested.set()

    def start_all(self) -> None:
        for child in self.children:
            child.start()
            log.info("child started", extra={"child": child.name, "pid": _pid(child)})

    def watch(self, poll_s: float = 0.2) -> None:
        """Keep the children running until a stop is requested."""
        while not self.stop_requested.wait(poll_s):
            now = time.monotonic()
            for watched in self.servers:
                self._tend_server(watched, now)
            for child in self.children:
                self._tend(child, now)

    def _tend_server(self, watched: ServerWatch, now: float) -> None:
        if watched.restart_at is None:
            if watched.server.pid is not None:
                return
            if now - watched.started_at >= STABLE_AFTER_S:
                watched.failures = 0
            delay = _backoff(watched.failures)
            watched.failures += 1
            watched.restart_at = now + delay
            log.warning(
                "embedded server exited unexpectedly; restarting",
                extra={"server": watched.name, "restart_in_s": delay},
            )
        elif now >= watched.restart_at:
            try:
                watched.server.start()
            except Exception as exc:  # a failed restart is retried with a longer wait
                delay = _backoff(watched.failures)
                watched.failures += 1
                watched.restart_at = now + delay
                log.error(
                    "embedded server did not restart",
                    extra={"server": watched.name, "error": str(exc), "retry_in_s": delay},
                )
                return
            watched.restart_at = None
            watched.started_at = now
            watched.restarts += 1
            log.warning(
                "embedded server restarted",
                extra={
                    "server": watched.name,
                    "pid": watched.server.pid,
                    "restarts": watched.restarts,
                },
            )

    def _tend(self, child: Child, now: float) -> None:
        if child.proc is not None:
            code = child.proc.poll()
            if code is None:
                return
            if now - child.started_at >= STABLE_AFTER_S:
                child.failures = 0
            delay = _backoff(child.failures)
            child.failures += 1
            log.warning(
                "child exited unexpectedly; restarting",
                extra={
                    "child": child.name,
                    "pid": child.proc.pid,
                    "returncode": code,
                    "restart_in_s": delay,
                    "restarts": child.restarts,
                },
            )
            # Whatever of its group survived (prefork children) must not outlive it.
            _kill_group(child.proc.pid)
            child.proc = None
            child.restart_at = now + delay
        elif child.restart_at is not None and now >= child.restart_at:
            child.start()
            child.restarts += 1
            log.warning(
                "child restarted",
                extra={"child": child.name, "pid": _pid(child), "restarts": child.restarts},
            )

    def stop_all(self) -> None:
        """Stop children in STOP_ORDER (web first: no new work comes in; worker last)."""
        if self.signals:
            log.info("stopping", extra={"signal": signal.Signals(self.signals[0]).name})
        by_name = {c.name: c for c in self.children}
        order = [by_name[n] for n in STOP_ORDER if n in by_name]
        order += [c for c in self.children if c not in order]
        for child in order:
            code = child.stop(STOP_TIMEOUT_S.get(child.name, 10.0), self.hurry)
            if code is not None:
                log.info("child stopped", extra={"child": child.name, "returncode": code})


def _pid(child: Child) -> int | None:
    return child.proc.pid if child.proc is not None else None


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While starting up, SIGTERM unwinds like Ctrl-C, so started servers are stopped."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_port_free(host: str, port: int, what: str, setting: str) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise click.ClickException(
                f"{what} cannot listen on {_bind(host, port)}: {exc.strerror}. Is another "
                f"`conveyor run` running? Choose another port with {setting}."
            ) from None


def _ensure_admin_token(settings: Settings) -> str:
    """Create the first admin token into its file (0600) unless the file exists.

    Returns what happened, for the banner. The token itself is never printed or logged.
    """
    from shared.db import Database
    from shared.models import TokenScope
    from shared.tokens import authenticate, create_token

    path = settings.admin_token_path
    pepper = settings.secret("token_pepper")
    database = Database(settings, pool_size=1, max_overflow=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL claims the file first: two starts never make two admin tokens.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            with database.session() as session:
                valid = authenticate(session, pepper, path.read_text().strip()) is not None
            if not valid:
                log.warning("admin token file holds no valid token", extra={"path": str(path)})
                return "invalid"
            return "kept"
        try:
            os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
            with database.session() as session:
                _, plain = create_token(session, pepper, "admin", TokenScope.ADMIN)
            with os.fdopen(fd, "w") as f:
                fd = -1
                f.write(plain + "\n")
        except BaseException:
            if fd != -1:
                os.close(fd)
            path.unlink(missing_ok=True)
            raise
        log.info("admin token created", extra={"path": str(path)})
        return "created"
    finally:
        database.engine.dispose()


def _print_banner(
    console: Console, settings: Settings, embedded: dict[str, bool], token_state: str
) -> None:
    from rich.panel import Panel
    from rich.table import Table

    def local(host: str) -> str:
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104

    api = f"http://{_bind(local(settings.web_host), settings.web_port)}"
    flower = f"http://{_bind(local(settings.flower_host), settings.flower_port)}"
    password_from = (
        "CONVEYOR_FLOWER_PASSWORD"
        if settings.flower_password is not None
        else f"{settings.state_dir / 'secrets.json'} (flower_password)"
    )
    token_note = {
        "created": "created now",
        "kept": "from an earlier start",
        "invalid": "[yellow]not valid for this database: delete the file and restart[/]",
    }[token_state]
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("API", f"{api}   (/healthz, /readyz)")
    table.add_row("Flower", f"{flower}   (user {settings.flower_user})")
    table.add_row("Flower password", password_from)
    exporter = f"http://{_bind(local(settings.exporter_host), settings.exporter_port)}/metrics"
    table.add_row("Metrics", f"{api}/metrics, {exporter}")
    table.add_row("Admin token", f"{settings.admin_token_path}   ({token_note})")
    for name, url, is_embedded in (
        ("PostgreSQL", settings.database_url, embedded["postgres"]),
        ("Redis", settings.redis_url, embedded["redis"]),
    ):
        where = _safe_url(url or "")
        table.add_row(name, f"{where}   ({'embedded' if is_embedded else 'external'})")
    table.add_row("State", str(settings.state_dir.resolve()))
    console.print(
        Panel(
            table,
            title="Conveyor is running",
            subtitle="Ctrl-C stops everything",
            expand=False,
        )
    )


# --- HTTP (check, job show) ---------------------------------------------------------------


def _http(
    method: str, url: str, token: str | None, body: object = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], Any]:
    """One request; returns (status, headers, JSON body or text). Network errors exit."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.ClickException(f"not an http(s) URL: {url}")
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, got, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, dict(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach {url}: {reason}") from None
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, got, parsed


def _api_base(settings: Settings, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = settings.web_host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - listening everywhere: ask loopback
        host = "127.0.0.1"
    return f"http://{_bind(host, settings.web_port)}"


def _api_token(settings: Settings, token: str | None) -> str:
    if token:
        return token
    path = settings.admin_token_path
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise click.ClickException(
            f"no token: pass --token, or start `conveyor run` once (it writes {path})"
        ) from None


def _problem(status: int, body: Any) -> str:
    if isinstance(body, dict):
        detail = body.get("detail") or body.get("title") or json.dumps(body)
        return f"HTTP {status}: {detail}"
    return f"HTTP {status}: {str(body)[:300]}"


def _get_job(base: str, token: str, job_id: str) -> dict[str, Any]:
    status, _, body = _http("GET", f"{base}/api/v1/jobs/{urllib.parse.quote(job_id)}", token)
    if status != 200 or not isinstance(body, dict):
        raise click.ClickException(f"cannot read job {job_id}: {_problem(status, body)}")
    return body


def _wait_job(
    base: str,
    token: str,
    job_id: str,
    timeout: float,
    show_progress: bool,
    fetch: Callable[[str, str, str], dict[str, Any]] = _get_job,
) -> dict[str, Any] | None:
    """Poll until the job finishes; None on timeout. Optionally with a progress bar.

    ``fetch`` reads the job's status (default: ``GET /api/v1/jobs/<id>``; an import's
    report carries the same ``state`` and ``progress``, plus ``rows_per_s``).
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    deadline = time.monotonic() + timeout
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("{task.fields[eta]}"),
        disable=not show_progress,
        transient=True,
    ) as bar:
        task = bar.add_task("PENDING", total=None, eta="", rate="")
        while True:
            job = fetch(base, token, job_id)
            state = str(job.get("state"))
            progress = job.get("progress") or {}
            percent = progress.get("percent")
            eta = progress.get("eta_seconds")
            rate = progress.get("rows_per_s")
            bar.update(
                task,
                description=" ".join(filter(None, [state, progress.get("message")])),
                total=100 if percent is not None else None,
                completed=percent or 0,
                eta=f"eta {eta:.0f} s" if isinstance(eta, int | float) else "",
                rate=f"{rate:,.0f} rows/s" if isinstance(rate, int | float) else "",
            )
            if state in FINISHED:
                if state == "SUCCESS":
                    bar.update(task, total=100, completed=100)
                return job
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


# --- commands -------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="conveyor")
def main() -> None:
    """Conveyor: deployment and bulk-import jobs over HTTP.

    Settings come from the environment (CONVEYOR_*, DATABASE_URL, REDIS_URL). With
    DATABASE_URL/REDIS_URL unset, embedded PostgreSQL and Redis keep their data in
    CONVEYOR_STATE_DIR (default .conveyor).
    """


@main.command()
def run() -> None:
    """Run everything on this machine: services, web, worker, beat, Flower and the exporter.

    Starts embedded PostgreSQL/Redis for whichever of DATABASE_URL/REDIS_URL is unset,
    migrates the database, creates the first admin token, then supervises the processes
    (restarting any that dies). Ctrl-C or SIGTERM stops everything in order.
    """
    from rich.console import Console

    from shared.logs import configure_logging
    from shared.migrate import upgrade

    settings = _load_settings()
    configure_logging(settings, "conveyor")
    console = Console()
    _check_port_free(settings.web_host, settings.web_port, "web", "CONVEYOR_WEB_PORT")
    _check_port_free(settings.flower_host, settings.flower_port, "Flower", "CONVEYOR_FLOWER_PORT")
    _check_port_free(
        settings.exporter_host, settings.exporter_port, "exporter", "CONVEYOR_EXPORTER_PORT"
    )
    embedded = {"postgres": not settings.database_url, "redis": not settings.redis_url}
    servers: list[Any] = []
    try:
        with (
            _sigterm_interrupts(),
            # Never join another run's servers: the launcher's lock refuses a second owner.
            _services(settings, postgres=True, redis=True, join=False, started=servers) as resolved,
        ):
            assert resolved.database_url is not None
            if any(embedded.values()):
                console.print(f"Embedded services are up (data in {settings.state_dir}).")
            upgrade(resolved.database_url)
            token_state = _ensure_admin_token(resolved)
            # Figures of a previous run must not add up with this one's (web and worker
            # write prometheus-client multiprocess files here).
            shutil.rmtree(resolved.metrics_path, ignore_errors=True)
            env = resolved.child_env()
            supervisor = Supervisor(
                [
                    Child("worker", worker_command(resolved), env),
                    Child("beat", beat_command(resolved), env),
                    Child("web", web_command(resolved), env),
                    Child("flower", flower_command(resolved), flower_env(resolved, env)),
                    Child("exporter", exporter_command(resolved), env),
                ],
                servers=[ServerWatch(server) for server in servers],
            )
            # From here signals only set flags: the supervisor stops children in order,
            # then leaving the block stops the embedded servers.
            signal.signal(signal.SIGINT, supervisor.request_stop)
            signal.signal(signal.SIGTERM, supervisor.request_stop)
            try:
                supervisor.start_all()
                _print_banner(console, resolved, embedded, token_state)
                supervisor.watch()
            finally:
                supervisor.stop_all()
    except KeyboardInterrupt:
        console.print("Interrupted while starting; stopped what had started.")
        return
    console.print("Conveyor stopped.")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--workers", "-w", type=click.IntRange(min=1), help="Server worker processes.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads per worker process.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def web(workers: int | None, threads: int | None, extra: tuple[str, ...]) -> None:
    """Serve the API with granian, or gunicorn (in the foreground). EXTRA goes to gunicorn."""
    settings = _require_urls(_load_settings(), postgres=True, redis=True, what="web")
    _exec(web_command(settings, workers=workers, threads=threads, extra=extra), _env(settings))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--queues", "-Q", default=QUEUES, show_default=True, help="Queues to consume.")
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="Worker processes.")
@click.option("--hostname", "-n", default=WORKER_HOSTNAME, show_default=True)
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str, concurrency: int | None, hostname: str, extra: tuple[str, ...]) -> None:
    """Run a Celery worker (in the foreground). EXTRA goes to `celery worker`."""
    settings = _require_urls(_load_settings(), postgres=True, redis=True, what="worker")
    argv = worker_command(
        settings, queues=queues, concurrency=concurrency, hostname=hostname, extra=extra
    )
    _exec(argv, _env(settings))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def beat(extra: tuple[str, ...]) -> None:
    """Run Celery beat, the periodic scheduler (in the foreground). Run exactly one."""
    settings = _require_urls(_load_settings(), postgres=False, redis=True, what="beat")
    _exec(beat_command(settings, extra=extra), _env(settings))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def flower(extra: tuple[str, ...]) -> None:
    """Run Flower behind basic auth (in the foreground). EXTRA goes to Flower."""
    settings = _require_urls(_load_settings(), postgres=False, redis=True, what="flower")
    _exec(flower_command(settings, extra=extra), flower_env(settings, _env(settings)))


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def exporter(extra: tuple[str, ...]) -> None:
    """Serve Prometheus figures on :9808 (Celery events, queues, workers). Run exactly one."""
    settings = _require_urls(_load_settings(), postgres=True, redis=True, what="exporter")
    _exec(exporter_command(settings, extra=extra), _env(settings))


def _env(settings: Settings) -> dict[str, str]:
    return settings.child_env()


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply migrations up to the latest revision (safe to repeat)."""
    from alembic.script import ScriptDirectory

    from shared.migrate import alembic_config, upgrade

    with _services(_load_settings(), postgres=True, redis=False) as settings:
        assert settings.database_url is not None
        upgrade(settings.database_url)
        head = ScriptDirectory.from_config(alembic_config(settings.database_url))
        click.echo(f"database {_safe_url(settings.database_url)} is at {head.get_current_head()}")


@main.group()
def token() -> None:
    """API tokens: create, list, revoke."""


@token.command("create")
@click.option(
    "--scope",
    type=click.Choice(["read", "write", "admin"]),
    required=True,
    help="read ⊂ write ⊂ admin.",
)
@click.option("--name", default="cli", show_default=True, help="What the token is for.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the token.")
def token_create(scope: str, name: str, quiet: bool) -> None:
    """Create a token and print it once: only its hash is stored."""
    from shared.db import Database
    from shared.models import TokenScope
    from shared.tokens import create_token

    with _services(_load_settings(), postgres=True, redis=False) as settings:
        database = Database(settings, pool_size=1, max_overflow=0)
        try:
            with database.session() as session:
                row, plain = create_token(
                    session, settings.secret("token_pepper"), name, TokenScope(scope)
                )
        finally:
            database.engine.dispose()
    if quiet:
        click.echo(plain)
        return
    click.echo(f"id:     {row.id}")
    click.echo(f"name:   {row.name}")
    click.echo(f"scope:  {row.scope}")
    click.echo(f"prefix: {row.prefix}")
    click.echo(f"token:  {plain}")
    click.echo("Store the token now: it is not shown again (only its hash is kept).", err=True)


@token.command("list")
def token_list() -> None:
    """List tokens (never their values)."""
    from rich.console import Console
    from rich.table import Table

    from shared.db import Database
    from shared.tokens import list_tokens

    with _services(_load_settings(), postgres=True, redis=False) as settings:
        database = Database(settings, pool_size=1, max_overflow=0)
        try:
            with database.session() as session:
                rows = list_tokens(session)
        finally:
            database.engine.dispose()
    table = Table("id", "name", "scope", "prefix", "created", "revoked")
    for row in rows:
        table.add_row(
            str(row.id),
            row.name,
            row.scope,
            row.prefix,
            f"{row.created_at:%Y-%m-%d %H:%M:%S %Z}",
            f"{row.revoked_at:%Y-%m-%d %H:%M:%S %Z}" if row.revoked_at else "",
        )
    # Piped output keeps whole ids instead of wrapping them at 80 columns.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@token.command("revoke")
@click.argument("id_or_prefix")
def token_revoke(id_or_prefix: str) -> None:
    """Revoke a token by its id or its printed prefix."""
    from shared.cache import TOKENS, Cache
    from shared.db import Database
    from shared.tokens import revoke_token

    with _services(_load_settings(), postgres=True, redis=True) as settings:
        database = Database(settings, pool_size=1, max_overflow=0)
        try:
            with database.session() as session:
                count = revoke_token(session, id_or_prefix)
        finally:
            database.engine.dispose()
        if count:
            # Web processes remember valid tokens for a moment: make them all forget.
            cache = Cache(settings)
            cache.after_write([TOKENS])
            cache.close()
    if count == 0:
        raise click.ClickException(f"no active token with id or prefix {id_or_prefix!r}")
    click.echo(f"revoked {count} token{'s' if count > 1 else ''}")


_url_option = click.option(
    "--url", help="API base URL (default: http://CONVEYOR_WEB_HOST:CONVEYOR_WEB_PORT)."
)
_token_option = click.option("--token", help="API token (default: the admin token file).")


def _echo_pipeline(ready: Any) -> None:
    """Workers and queue depths from a /readyz answer."""
    if not isinstance(ready, dict):
        return
    workers = ready.get("workers")
    if isinstance(workers, dict):
        hosts = workers.get("hosts") or {}
        names = ", ".join(f"{h} ({'up' if up else 'silent'})" for h, up in hosts.items())
        click.echo(f"workers: {workers.get('up', 0)} up" + (f": {names}" if names else ""))
    elif workers is not None:
        click.echo(f"workers: {workers}")
    queues = ready.get("queues")
    if isinstance(queues, dict):
        click.echo("queues: " + ", ".join(f"{q} {n}" for q, n in queues.items()))


@main.command()
@_url_option
@_token_option
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the job.")
def check(url: str | None, token: str | None, timeout: float) -> None:
    """Submit a canary job over HTTP and wait for it; exit 1 unless it succeeds."""
    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    status, _, body = _http("GET", f"{base}/readyz", None)
    click.echo(f"readyz: {status}")
    if status != 200:
        raise click.ClickException(f"not ready: {_problem(status, body)}")
    _echo_pipeline(body)
    started = time.monotonic()
    status, headers, body = _http("POST", f"{base}/api/v1/canaries", plain, body={})
    if status != 202:
        raise click.ClickException(f"canary refused: {_problem(status, body)}")
    location = headers.get("Location") or headers.get("location") or ""
    job_id = (body.get("id") if isinstance(body, dict) else None) or location.rsplit("/", 1)[-1]
    if not job_id:
        raise click.ClickException("the API accepted the canary but named no job")
    job = _wait_job(base, plain, str(job_id), timeout, show_progress=False)
    elapsed = time.monotonic() - started
    if job is None:
        raise click.ClickException(f"canary {job_id} did not finish within {timeout:.0f} s")
    result = job.get("result") or {}
    click.echo(
        f"canary {job_id}: {job['state']} in {elapsed:.2f} s "
        f"(queue wait {result.get('queue_wait_ms')} ms, run {result.get('run_ms')} ms)"
    )
    if job["state"] != "SUCCESS":
        raise click.ClickException(f"canary ended {job['state']}: {job.get('error')}")


@main.group()
def job() -> None:
    """Jobs, through the HTTP API."""


@job.command("show")
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@_url_option
@_token_option
def job_show(
    job_id: str, wait: bool, as_json: bool, timeout: float, url: str | None, token: str | None
) -> None:
    """Show a job; with --wait, follow it until it finishes."""
    from rich.console import Console
    from rich.table import Table

    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    if wait:
        found = _wait_job(base, plain, job_id, timeout, show_progress=not as_json)
        if found is None:
            raise click.ClickException(f"job {job_id} did not finish within {timeout:.0f} s")
        data = found
    else:
        data = _get_job(base, plain, job_id)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in data.items():
            shown = json.dumps(value, indent=2) if isinstance(value, dict | list) else str(value)
            table.add_row(key, shown)
        Console().print(table)
    if wait and data.get("state") != "SUCCESS":
        sys.exit(1)


# --- import ---------------------------------------------------------------------------------


IMPORT_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}
IMPORT_EXTENSIONS = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}
UPLOAD_PIECE = 256 * 1024  # how often the upload bar moves, in bytes
UPLOAD_TIMEOUT_S = 300.0  # per socket operation, not for the whole upload
SHOWN_ERRORS = 10


class _UploadBody:
    """A file-like request body: reads the file from disk a piece at a time, moving a bar.

    ``http.client`` sends a body that has ``read`` in blocks, so the file is never held
    whole; the caller sets ``Content-Length`` (the file's size), so it is not chunked.
    """

    def __init__(self, path: Path, advance: Callable[[int], None]) -> None:
        self._file = path.open("rb")
        self._advance = advance
        self._unreported = 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size if size and size > 0 else UPLOAD_PIECE)
        self._unreported += len(data)
        if self._unreported >= UPLOAD_PIECE or not data:
            self._advance(self._unreported)
            self._unreported = 0
        return data

    def close(self) -> None:
        self._file.close()


def _import_format(path: Path, given: str | None) -> tuple[str, bool]:
    """(format, gzip-compressed) from ``--format`` or the name: x.csv, x.ndjson.gz, ..."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    if gzipped:
        suffixes = suffixes[:-1]
    if given:
        return given, gzipped
    fmt = IMPORT_EXTENSIONS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise click.ClickException(
            f"cannot tell the format of {path.name} from its extension (.csv, .ndjson, "
            ".jsonl, optionally .gz): pass --format"
        )
    return fmt, gzipped


def _problem_details(status: int, body: Any) -> str:
    """A refusal with each field's message (a 422 names every bad column)."""
    message = _problem(status, body)
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        lines = [
            f"  {e.get('field')}: {e.get('message')}" for e in body["errors"] if isinstance(e, dict)
        ]
        message += "\n" + "\n".join(lines)
    return message


def _upload(
    url: str, token: str, path: Path, content_type: str, headers: dict[str, str]
) -> tuple[int, Any]:
    """POST the file as the raw body with an upload progress bar; (status, JSON body)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.ClickException(f"not an http(s) URL: {url}")
    size = path.stat().st_size
    console = Console(stderr=True)
    with Progress(
        TextColumn("uploading {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as bar:
        task = bar.add_task(path.name, total=size)
        body = _UploadBody(path, lambda n: bar.advance(task, n))
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            url,
            data=body,  # file-like: http.client reads it in blocks
            method="POST",
            headers={
                **headers,
                "Accept": "application/json",
                "Authorization": f"Bearer {token}",
                "Content-Type": content_type,
                "Content-Length": str(size),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=UPLOAD_TIMEOUT_S) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise click.ClickException(
                f"upload to {url} failed: {reason} (a server refusing a file over its size "
                "limit may close the connection before the upload ends)"
            ) from None
        finally:
            body.close()
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed


def _get_import(base: str, token: str, job_id: str) -> dict[str, Any]:
    status, _, body = _http("GET", f"{base}/api/v1/imports/{urllib.parse.quote(job_id)}", token)
    if status != 200 or not isinstance(body, dict):
        raise click.ClickException(f"cannot read import {job_id}: {_problem(status, body)}")
    return body


def _shown(value: object) -> Text:
    """A value from a file or the server, shown literally: no rich markup, no control codes.

    An excerpt is whatever the uploaded file held; an escape sequence in it must not
    drive the terminal.
    """
    from rich.text import Text

    raw = "" if value is None else str(value)
    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in raw))


def _print_import_report(console: Console, base: str, token: str, report: dict[str, Any]) -> None:
    """The summary, then the first rejected rows."""
    from rich.table import Table

    def count(name: str) -> str:
        value = report.get(name)
        return f"{value:,}" if isinstance(value, int) else str(value)

    rate = report.get("rows_per_s")
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("import", _shown(report.get("id")))
    table.add_row("state", _shown(report.get("state")))
    error = report.get("error")
    if isinstance(error, dict):
        table.add_row("error", _shown(f"{error.get('code')}: {error.get('message')}"))
    table.add_row("target", _shown(f"{report.get('target')} ({report.get('format')})"))
    table.add_row("rows read", count("rows_read"))
    table.add_row("inserted", count("rows_inserted"))
    table.add_row("updated", count("rows_updated"))
    table.add_row("unchanged", count("rows_unchanged"))
    table.add_row("rejected", count("rows_rejected"))
    table.add_row("duplicates in file", count("rows_duplicate"))
    table.add_row("duration", _shown(f"{report.get('duration_s')} s"))
    table.add_row("rows/s", f"{rate:,.0f}" if isinstance(rate, int | float) else "-")
    console.print(table)

    if not report.get("rows_rejected"):
        return
    links = report.get("links") or {}
    status, _, page = _http("GET", f"{base}{links.get('errors')}?page_size={SHOWN_ERRORS}", token)
    if status != 200 or not isinstance(page, dict):
        console.print(_shown(f"cannot read the errors: {_problem(status, page)}"))
        return
    errors = Table("line", "column", "reason", "excerpt", title="first rejected rows")
    for item in page.get("items") or []:
        errors.add_row(
            _shown(item.get("line")),
            _shown(item.get("column")),
            _shown(item.get("reason")),
            _shown(item.get("excerpt")),
        )
    console.print(errors)
    total = page.get("total") or 0
    if total > SHOWN_ERRORS:
        console.print(
            _shown(
                f"{total - SHOWN_ERRORS:,} more: GET {links.get('errors')} "
                "(with 'Accept: text/csv', all of them as CSV)"
            )
        )


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--target", type=click.Choice(["features", "test_cases"]), required=True, help="Table."
)
@click.option("--format", "fmt", type=click.Choice(["csv", "ndjson"]), help="Default: extension.")
@click.option("--max-errors", type=click.IntRange(0, 10_000_000), help="Rejected rows allowed.")
@click.option("--idempotency-key", help="Retrying with the same key never imports twice.")
@click.option("--wait", is_flag=True, help="Follow the job, then print the summary and errors.")
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@_url_option
@_token_option
def import_file(
    file: Path,
    target: str,
    fmt: str | None,
    max_errors: int | None,
    idempotency_key: str | None,
    wait: bool,
    timeout: float,
    url: str | None,
    token: str | None,
) -> None:
    """Upload FILE (CSV or NDJSON, optionally .gz) as an import into --target.

    Prints the import's job id. With --wait, follows the job with a progress bar (rows/s,
    ETA), then prints the summary and the first rejected rows; exits 1 unless it succeeds.
    """
    from rich.console import Console

    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    fmt, gzipped = _import_format(file, fmt)
    query = {"target": target}
    if max_errors is not None:
        query["max_errors"] = str(max_errors)
    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    endpoint = f"{base}/api/v1/imports?{urllib.parse.urlencode(query)}"
    status, body = _upload(endpoint, plain, file, IMPORT_TYPES[fmt], headers)
    if status not in (200, 202) or not isinstance(body, dict):
        raise click.ClickException(f"import refused: {_problem_details(status, body)}")
    job_id = str(body.get("id"))
    stored = body.get("import") or {}
    replay = " (an earlier upload with this Idempotency-Key)" if status == 200 else ""
    click.echo(f"import {job_id}: {body.get('state')}{replay}")
    click.echo(
        f"  {target} from {file.name}: {stored.get('size_bytes')} bytes, "
        f"sha256 {stored.get('sha256')}"
    )
    if not wait:
        click.echo(f"  follow it: conveyor job show {job_id} --wait")
        return
    console = Console(width=None if sys.stdout.isatty() else 200)
    job = _wait_job(base, plain, job_id, timeout, show_progress=True, fetch=_get_import)
    if job is None:
        raise click.ClickException(f"import {job_id} did not finish within {timeout:.0f} s")
    _print_import_report(console, base, plain, job)
    if job.get("state") != "SUCCESS":
        sys.exit(1)


# --- environments and deployments -----------------------------------------------------------


@main.group("env")
def env_group() -> None:
    """Deployment environments, through the HTTP API."""


@env_group.command("create")
@click.argument("name")
@click.option(
    "--driver",
    type=click.Choice(["record", "command", "webhook"]),
    default="record",
    show_default=True,
)
@click.option(
    "--config", "config_json", default="{}", help="Driver config as JSON, e.g. '{\"argv\": [...]}'."
)
@click.option("--health-check-url", help="Verify polls it until 2xx.")
@click.option(
    "--no-require-passing-tests", is_flag=True, help="Deploy features whatever their tests say."
)
@_url_option
@_token_option
def env_create(
    name: str,
    driver: str,
    config_json: str,
    health_check_url: str | None,
    no_require_passing_tests: bool,
    url: str | None,
    token: str | None,
) -> None:
    """Create an environment (admin token)."""
    try:
        config = json.loads(config_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--config") from None
    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    body = {
        "name": name,
        "driver": driver,
        "config": config,
        "health_check_url": health_check_url,
        "require_passing_tests": not no_require_passing_tests,
    }
    status, _, answer = _http("POST", f"{base}/api/v1/environments", plain, body=body)
    if status != 201:
        raise click.ClickException(f"not created: {_problem_details(status, answer)}")
    click.echo(f"environment {answer['name']}: {answer['driver']} driver")


@env_group.command("list")
@_url_option
@_token_option
def env_list(url: str | None, token: str | None) -> None:
    """Environments with their current version and last deployment."""
    from rich.console import Console
    from rich.table import Table

    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    status, _, answer = _http("GET", f"{base}/api/v1/environments", plain)
    if status != 200 or not isinstance(answer, dict):
        raise click.ClickException(f"cannot list environments: {_problem(status, answer)}")
    table = Table("name", "driver", "current version", "last deployment")
    for env in answer["items"]:
        last = env.get("last_deployment")
        shown = f"{last['version']} {last['status']} ({last['id']})" if last else "-"
        table.add_row(env["name"], env["driver"], env.get("current_version") or "-", shown)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _get_deployment(base: str, token: str, job_id: str) -> dict[str, Any]:
    url = f"{base}/api/v1/deployments/{urllib.parse.quote(job_id)}"
    status, _, body = _http("GET", url, token)
    if status != 200 or not isinstance(body, dict):
        raise click.ClickException(f"cannot read deployment {job_id}: {_problem(status, body)}")
    return body


@main.command("deploy")
@click.argument("feature")
@click.argument("environment")
@click.argument("version")
@click.option("--by-id", is_flag=True, help="FEATURE is the numeric id, not the external id.")
@click.option("--force", is_flag=True, help="Deploy even if test cases have not all passed.")
@click.option(
    "--wait", is_flag=True, help="Show the steps as they happen; exit 1 unless it succeeds."
)
@click.option("--timeout", default=3600.0, show_default=True, help="Seconds --wait waits.")
@_url_option
@_token_option
def deploy(
    feature: str,
    environment: str,
    version: str,
    by_id: bool,
    force: bool,
    wait: bool,
    timeout: float,
    url: str | None,
    token: str | None,
) -> None:
    """Deploy VERSION of FEATURE (its external id) to ENVIRONMENT."""
    settings = _load_settings()
    base, plain = _api_base(settings, url), _api_token(settings, token)
    body: dict[str, Any] = {"environment": environment, "version": version, "force": force}
    if by_id:
        if not feature.isdigit():
            raise click.BadParameter("with --by-id, FEATURE is a number", param_hint="FEATURE")
        body["feature_id"] = int(feature)
    else:
        body["feature_external_id"] = feature
    status, _, answer = _http("POST", f"{base}/api/v1/deployments", plain, body=body)
    if status not in (200, 202) or not isinstance(answer, dict):
        raise click.ClickException(f"deployment refused: {_problem_details(status, answer)}")
    job_id = str(answer["id"])
    click.echo(f"deployment {job_id}: {answer['state']}")
    if not wait:
        click.echo(f"  follow it: conveyor job show {job_id} --wait")
        return
    deadline = time.monotonic() + timeout
    shown = 0
    while True:
        current = _get_deployment(base, plain, job_id)
        events = current.get("events") or []
        for event in events[shown:]:
            first, *rest = str(event["message"]).splitlines() or [""]
            click.echo(f"{event['at']}  {event['step']:<9} {event['status']:<9} {first}")
            for line in rest:
                click.echo(f"{'':>40}{line}")
        shown = len(events)
        if current["state"] in FINISHED:
            break
        if time.monotonic() >= deadline:
            raise click.ClickException(f"deployment {job_id} did not finish within {timeout:.0f} s")
        time.sleep(0.3)
    error = current.get("error") or {}
    outcome = f"{current['state']} ({current['status']})"
    if error:
        outcome += f": {error.get('code')}: {error.get('message')}"
    click.echo(f"deployment {job_id}: {outcome}")
    if current["state"] != "SUCCESS":
        sys.exit(1)


if __name__ == "__main__":
    main()
