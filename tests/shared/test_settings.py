"""Settings: typed, built directly in tests, secrets refused outside development."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.settings import Settings


def test_production_requires_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="CONVEYOR_TOKEN_PEPPER"):
        Settings(env="production", state_dir=tmp_path)
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(env="production", token_pepper="short", flower_password="x" * 20)
    ok = Settings(env="production", token_pepper="p" * 32, flower_password="f" * 32)
    assert ok.secret("token_pepper") == "p" * 32


def test_development_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    first = Settings(state_dir=tmp_path).secret("token_pepper")
    second = Settings(state_dir=tmp_path).secret("token_pepper")
    assert first == second
    assert len(first) >= 32
    path = tmp_path / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["flower_password"] != first


def test_child_env_carries_resolved_urls(tmp_path: Path) -> None:
    env = Settings(
        state_dir=tmp_path, database_url="postgresql://x/y", redis_url="redis://z:1/0"
    ).child_env()
    assert env["DATABASE_URL"] == "postgresql://x/y"
    assert env["REDIS_URL"] == "redis://z:1/0"
    assert env["CONVEYOR_STATE_DIR"] == str(tmp_path.resolve())
