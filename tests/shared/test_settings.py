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


def test_processes_starting_together_agree_on_the_pepper(tmp_path: Path) -> None:
    # gunicorn's workers boot at once on a fresh state folder: all must read one pepper.
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from shared.settings import Settings;"
        "sys.stdout.write(Settings(state_dir=Path(sys.argv[1])).secret('token_pepper'))"
    )
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / "state")],
            cwd=root,
            stdout=subprocess.PIPE,
        )
        for _ in range(12)
    ]
    peppers = {p.communicate(timeout=60)[0] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(peppers) == 1
    assert peppers.pop().decode() == Settings(state_dir=tmp_path / "state").secret("token_pepper")
