"""One typed settings object, read from the environment once.

This is the only module that reads the environment (ruff bans ``os.environ`` elsewhere).
Tests build ``Settings(database_url=..., redis_url=...)`` directly instead of patching env.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Secrets that get a generated, persisted value in development and must be set elsewhere.
_DEV_SECRETS = ("token_pepper", "flower_password", "webhook_secret")
# Required for any process to start in production. The webhook secret is checked when a
# webhook deployment signs its request instead: a site without webhook environments need
# not invent one (and docker-compose.yml does not pass it).
_PRODUCTION_SECRETS = ("token_pepper", "flower_password")
SecretName = Literal["token_pepper", "flower_password", "webhook_secret"]


class Settings(BaseSettings):
    """Conveyor's configuration. Every field reads ``CONVEYOR_<NAME>`` (URLs also plain names)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    env: Literal["development", "production", "test"] = "development"

    # Services. Unset → the embedded launcher starts real servers under state_dir.
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "CONVEYOR_DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "CONVEYOR_REDIS_URL")
    )
    state_dir: Path = Path(".conveyor")
    embedded_pg_port: int = 0  # 0: a free port, remembered in state_dir for the next start
    embedded_redis_port: int = 0
    embedded_pg_user: str = "conveyor-pg"  # system user PostgreSQL runs as when we are root

    # HTTP.
    web_host: str = "127.0.0.1"
    web_port: int = 8000
    # The HTTP server, chosen by measurement on 2 cores (README, "Serving"; wrk -t2 -c64 on
    # the cached feature list): granian 2 workers x 4 threads 9.6-9.8k req/s, gunicorn
    # gthread 4x4 4.9k. granian parses HTTP in Rust; gunicorn does it in Python.
    web_server: Literal["granian", "gunicorn"] = "granian"
    granian_workers: int = 2
    granian_threads: int = 4  # blocking (Python) threads per worker: 1 7.8k, 2 8.2k, 8 9.6k
    # gunicorn gthread layout, chosen by `make bench-load` on 2 cores: 4 processes of 4
    # threads served the cached GET at 2.6k req/s (p99 ≤ 800 ms), 2x8 at 1.4k, 4x8 at
    # 2.1k: one GIL per process limits threads, and 4 processes keep both cores busy.
    web_workers: int = 4
    web_threads: int = 4
    public_url: str | None = None  # base for Location headers behind a proxy

    # Flower: bound to loopback and behind basic auth by default.
    flower_host: str = "127.0.0.1"
    flower_port: int = 5555
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    # Tokens are stored as HMAC-SHA256(pepper, token).
    token_pepper: SecretStr | None = None
    admin_token_file: Path | None = None  # default: state_dir/admin-token

    # Database pool.
    db_pool_size: int = 10
    db_max_overflow: int = 20
    db_pool_timeout_s: float = 10.0
    db_pool_recycle_s: int = 1800
    db_pool_pre_ping: bool = True  # test a pooled connection before use (survives DB restarts)
    # ... unless it was in use less than this long ago (HikariCP's aliveBypassWindowMs, 500
    # ms): under load a connection goes back and forth in milliseconds, and the test is a
    # round trip per checkout. 0 tests at every checkout.
    db_pool_ping_after_idle_s: float = 0.5
    db_statement_timeout_ms: int = 30_000

    # Celery / jobs.
    redis_socket_timeout_s: float = 5.0
    # "conveyor": kombu's Redis transport with one client per channel (shared/broker.py);
    # "kombu": kombu's own, the way back should a kombu upgrade disagree with it.
    broker_transport: Literal["conveyor", "kombu"] = "conveyor"
    broker_visibility_timeout_s: int = 3600  # longer than any task slice (job_slice_s)
    job_slice_s: int = 600
    job_max_attempts: int = 3
    job_lease_s: int = 60
    worker_concurrency: int = 2
    reaper_interval_s: float = 30.0
    pending_republish_after_s: float = 60.0
    result_expires_s: int = 86_400

    # Imports.
    import_max_bytes: int = 2 * 1024**3  # an upload larger than this is refused (413)
    import_max_errors: int = 1000  # default rejected-row budget per import
    # Writer processes per import. Measured (README, "Import performance"): with two,
    # one chunk's COPY overlaps the next one's round trips and COMMIT, and PostgreSQL
    # works on two backends: 15.8 s against 20.2 s for a million rows after the upload.
    import_writers: int = 2
    # How uploads are kept in their large object (shared/storage.py: gzip is faster too).
    upload_compression: Literal["gzip", "identity"] = "gzip"
    upload_retention_s: int = 3600  # finished imports' files are deleted after this grace
    cleanup_interval_s: float = 300.0
    # How often beat folds the row-count deltas (shared/counts.py): a list's total sums
    # what piled up since, one row per write statement and status.
    count_compact_interval_s: float = 30.0
    # Test-only fault injection, e.g. "after_copy:3" kills the worker process after the
    # third chunk's rows are written but before COMMIT. Ignored unless env == "test".
    fault: str | None = None

    # Deployments.
    # HMAC-SHA256 key that signs webhook deployments. Only the worker reads it; it never
    # travels in task arguments, job rows, Redis or logs.
    webhook_secret: SecretStr | None = None
    deploy_webhook_attempts: int = 5  # tries per webhook call on 5xx, timeouts, refusals
    deploy_webhook_backoff_s: float = 1.0  # first wait between tries; doubles each time
    deploy_verify_timeout_s: float = 60.0  # how long verify polls the health-check URL
    deploy_verify_interval_s: float = 1.0
    deploy_output_max_chars: int = 4000  # command output kept in an event (its tail)
    # Environment variables a `command` driver's process gets (nothing else: the worker's
    # own environment holds database passwords and secrets).
    deploy_command_env: list[str] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "KUBECONFIG"]
    deploy_stats_ttl_s: int = 60  # deployments:stats:* cache entries live this long

    # Reads and caching (shared/cache.py; README "Features and test cases"). TTLs per data
    # class: single rows change rarely and every write invalidates them exactly, so they
    # may live an hour; a list page goes stale with any write to its table, so its TTL only
    # bounds the memory of pages nobody asks for again. (The third class, deployment stats
    # at 60 s, is deploy_stats_ttl_s above.)
    cache_item_ttl_s: int = 3600  # feature:{id}, test_case:{id}
    cache_list_ttl_s: int = 300  # features:list:*, test_cases:list:*
    # In-process LRU (L1): entries live this long, and it is the longest a write waits for
    # every web process to acknowledge its invalidation (see shared/cache.py).
    cache_local_ttl_s: float = 1.0
    cache_local_max_entries: int = 10_000
    # L1 hits of cached GETs answered before Flask (web/fastpath.py); off = through Flask.
    cache_fast_path: bool = True
    token_cache_max_entries: int = 10_000  # authenticated tokens remembered per process
    cache_warm_top: int = 100  # the beat task loads this many most-read features into Redis
    cache_warm_interval_s: float = 60.0
    compress_min_bytes: int = 1000  # gzip responses of at least this size
    compress_level: int = 6

    log_level: str = "INFO"
    log_json: bool = True

    # Observability (shared/metrics.py, worker/exporter.py, shared/tracing.py; README
    # "Observability"). Off: no figures are recorded and /metrics answers 404 (the bench
    # compares the enqueue path both ways).
    metrics_enabled: bool = True
    metrics_dir: Path | None = None  # multiprocess files; default: state_dir/metrics
    # Set: every metrics endpoint asks for "Authorization: Bearer <token>". Unset: web
    # answers /metrics to loopback clients only and the exporter must listen on loopback.
    metrics_token: SecretStr | None = None
    exporter_host: str = "127.0.0.1"
    exporter_port: int = 9808  # celery-exporter's port, so scrape configs carry over
    # A worker whose last heartbeat (every 2 s) is older than this counts as down.
    worker_heartbeat_timeout_s: float = 10.0
    # Tracing is opt-in: set, OpenTelemetry instruments Flask, SQLAlchemy and Celery.
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_ENDPOINT", "CONVEYOR_OTEL_EXPORTER_OTLP_ENDPOINT"
        ),
    )
    otel_service_name: str = "conveyor"

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Settings:
        if self.env == "production":
            missing = [n for n in _PRODUCTION_SECRETS if getattr(self, n) is None]
            if missing:
                names = ", ".join(f"CONVEYOR_{n.upper()}" for n in missing)
                raise ValueError(f"{names} must be set when CONVEYOR_ENV=production")
            for name in _DEV_SECRETS:
                value = getattr(self, name)
                if value is not None and len(value.get_secret_value()) < 16:
                    raise ValueError(f"CONVEYOR_{name.upper()} must be at least 16 characters")
        return self

    @property
    def metrics_path(self) -> Path:
        return (self.metrics_dir or self.state_dir / "metrics").resolve()

    @property
    def admin_token_path(self) -> Path:
        return self.admin_token_file or self.state_dir / "admin-token"

    @cached_property
    def _dev_secrets(self) -> dict[str, str]:
        """Secrets generated once per state folder (mode 0600), for development only."""
        path = self.state_dir / "secrets.json"
        stored = _read_secrets(path)
        if all(n in stored for n in _DEV_SECRETS):
            return stored
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Processes starting together on a fresh folder (gunicorn's workers) would each
        # generate, and each keep, a different pepper: one token valid on one worker only.
        # The lock makes every later process read what the first one wrote.
        with (self.state_dir / "secrets.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            stored = _read_secrets(path)
            missing = [n for n in _DEV_SECRETS if n not in stored]
            if missing:
                stored.update({n: secrets.token_urlsafe(32) for n in missing})
                tmp = path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(stored, f)
                tmp.replace(path)
        return stored

    def secret(self, name: SecretName) -> str:
        """The secret's value: set explicitly, or (outside production) generated and persisted."""
        value: SecretStr | None = getattr(self, name)
        if value is not None:
            return value.get_secret_value()
        if self.env == "production":
            raise RuntimeError(f"CONVEYOR_{name.upper()} must be set when CONVEYOR_ENV=production")
        return self._dev_secrets[name]

    def command_env(self) -> dict[str, str]:
        """The environment a deployment command runs with: only ``deploy_command_env``."""
        return {name: os.environ[name] for name in self.deploy_command_env if name in os.environ}

    def child_env(self) -> dict[str, str]:
        """The environment for a child process: ours, plus resolved service URLs."""
        env = dict(os.environ)
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        env["CONVEYOR_STATE_DIR"] = str(self.state_dir.resolve())
        env["CONVEYOR_ENV"] = self.env
        return env


def _read_secrets(path: Path) -> dict[str, str]:
    try:
        stored: dict[str, str] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return stored


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; keyword overrides win."""
    return Settings(**overrides)  # type: ignore[arg-type]
