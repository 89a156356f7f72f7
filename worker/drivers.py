"""Deployment drivers: how a version reaches an environment, and how it is verified.

A driver's ``deploy`` either returns a short report for the step's event or raises
``DeployError``. Long waits (a command running, a webhook's backoff, health polling) call
``heartbeat`` regularly, which renews the job's lease: a worker that dies stops renewing,
and the reaper notices within one lease.

* ``record`` changes nothing outside Conveyor: the environment's recorded version is all.
* ``command`` runs an argument list (no shell) with a clean environment, a timeout that
  kills the whole process group, and its output kept (the tail) for the event.
* ``webhook`` POSTs JSON signed with HMAC-SHA256, retrying 5xx, timeouts and refused
  connections with exponential backoff; any other answer but 2xx is final.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shared.deployments import CommandConfig, WebhookConfig, render_argv
from shared.settings import Settings

Heartbeat = Callable[[], None]

SIGNATURE_HEADER = "X-Conveyor-Signature"
TIMESTAMP_HEADER = "X-Conveyor-Timestamp"
DELIVERY_HEADER = "X-Conveyor-Delivery"
MAX_BACKOFF_S = 60.0


class DeployError(Exception):
    """The driver could not deploy (or the environment is not healthy)."""


@dataclass(frozen=True)
class Target:
    """What to deploy where; ``action`` is ``deploy`` or ``rollback``."""

    deployment_id: int
    job_id: str
    feature: str
    environment: str
    version: str
    previous_version: str | None
    action: str


class Driver(Protocol):
    def deploy(self, target: Target, heartbeat: Heartbeat) -> str: ...


def trim(text: str, limit: int) -> str:
    """The last ``limit`` characters of ``text`` (where a failure usually explains itself)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return f"[{len(text) - limit} characters cut]…" + text[-limit:]


class RecordDriver:
    def deploy(self, target: Target, heartbeat: Heartbeat) -> str:
        return f"recorded {target.version} (the record driver changes nothing else)"


class CommandDriver:
    def __init__(self, config: CommandConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    def deploy(self, target: Target, heartbeat: Heartbeat) -> str:
        argv = render_argv(
            self.config.argv,
            feature=target.feature,
            version=target.version,
            environment=target.environment,
        )
        limit = self.settings.deploy_output_max_chars
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                env=self.settings.command_env(),
                # Its own process group, so a timeout kills what it started too.
                start_new_session=True,
            )
        except OSError as exc:
            raise DeployError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self.config.timeout_s
        beat = _beat_interval(self.settings)
        while True:
            try:
                # communicate() may be called again after a timeout without losing output.
                out, err = proc.communicate(
                    timeout=max(0.01, min(beat, deadline - time.monotonic()))
                )
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    _kill_group(proc)
                    out, err = proc.communicate()
                    raise DeployError(
                        f"timed out after {self.config.timeout_s:g} s and was killed"
                        + _output(out, err, limit)
                    ) from None
                heartbeat()
        if proc.returncode != 0:
            raise DeployError(f"exited with status {proc.returncode}" + _output(out, err, limit))
        return "exited 0" + _output(out, err, limit)


def _output(out: str, err: str, limit: int) -> str:
    parts = []
    if out.strip():
        parts.append(f"\nstdout:\n{trim(out, limit)}")
    if err.strip():
        parts.append(f"\nstderr:\n{trim(err, limit)}")
    return "".join(parts)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
        os.killpg(proc.pid, signal.SIGKILL)


def _beat_interval(settings: Settings) -> float:
    return max(0.2, settings.job_lease_s / 4)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirected POST would be replayed as a GET (or to another host): a 3xx is an answer.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>." + body)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookDriver:
    def __init__(self, config: WebhookConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings

    def deploy(self, target: Target, heartbeat: Heartbeat) -> str:
        # Read here, in the worker, at the moment of signing: never a task argument.
        try:
            secret = self.settings.secret("webhook_secret")
        except RuntimeError as exc:
            raise DeployError(str(exc)) from None
        body = json.dumps(
            {
                "action": target.action,
                "deployment_id": target.deployment_id,
                "job_id": target.job_id,
                "feature": target.feature,
                "environment": target.environment,
                "version": target.version,
                "previous_version": target.previous_version,
            },
            separators=(",", ":"),
        ).encode()
        attempts = max(1, self.settings.deploy_webhook_attempts)
        delay = self.settings.deploy_webhook_backoff_s
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            timestamp = str(int(time.time()))
            request = urllib.request.Request(  # noqa: S310 - the URL was validated as http(s)
                self.config.url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": "conveyor-deploy",
                    TIMESTAMP_HEADER: timestamp,
                    SIGNATURE_HEADER: sign(secret, timestamp, body),
                    # The same on every retry: the receiver can tell a repeat.
                    DELIVERY_HEADER: f"{target.job_id}:{target.action}:{target.version}",
                },
            )
            try:
                with _OPENER.open(request, timeout=self.config.timeout_s) as response:
                    status = response.status
                    answer = response.read(2048).decode(errors="replace")
            except urllib.error.HTTPError as exc:
                status, answer = exc.code, exc.read(2048).decode(errors="replace")
                exc.close()
            except (urllib.error.URLError, TimeoutError, OSError) as exc:
                status, answer = 0, str(getattr(exc, "reason", exc))
            if 200 <= status < 300:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                return f"HTTP {status}{tried}" + (f": {trim(answer, 500)}" if answer else "")
            failures.append(f"HTTP {status}" if status else f"no answer ({answer})")
            if status and not (status >= 500):
                # 4xx (and 3xx): the receiver refused this request; repeating it won't help.
                raise DeployError(f"webhook answered HTTP {status}: {trim(answer, 500)}")
            if attempt < attempts:
                _sleep_with_heartbeat(delay, heartbeat, self.settings)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise DeployError(f"webhook failed {attempts} times: {', '.join(failures)}")


def _sleep_with_heartbeat(seconds: float, heartbeat: Heartbeat, settings: Settings) -> None:
    end = time.monotonic() + seconds
    beat = _beat_interval(settings)
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(beat, left))
        heartbeat()


def check_health(url: str, settings: Settings, heartbeat: Heartbeat) -> str:
    """Poll ``url`` until it answers 2xx; DeployError after ``deploy_verify_timeout_s``."""
    started = time.monotonic()
    deadline = started + settings.deploy_verify_timeout_s
    tries = 0
    last = ""
    while True:
        tries += 1
        timeout = max(0.5, min(5.0, deadline - time.monotonic()))
        request = urllib.request.Request(url, headers={"User-Agent": "conveyor-verify"})  # noqa: S310 - validated http(s)
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            status, last = 0, str(getattr(exc, "reason", exc))
        if 200 <= status < 300:
            return f"{url} answered HTTP {status} (try {tries})"
        if status:
            last = f"HTTP {status}"
        if time.monotonic() + settings.deploy_verify_interval_s > deadline:
            raise DeployError(
                f"{url} not healthy after {time.monotonic() - started:.1f} s "
                f"and {tries} tries (last: {last})"
            )
        _sleep_with_heartbeat(settings.deploy_verify_interval_s, heartbeat, settings)


def driver_for(kind: str, config: dict[str, Any], settings: Settings) -> Driver:
    """The environment's driver, its config validated again (the row may predate a rule)."""
    if kind == "command":
        return CommandDriver(CommandConfig.model_validate(config), settings)
    if kind == "webhook":
        return WebhookDriver(WebhookConfig.model_validate(config), settings)
    if kind == "record":
        return RecordDriver()
    raise DeployError(f"unknown driver {kind!r}")
