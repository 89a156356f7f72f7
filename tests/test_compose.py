"""docker-compose.yml is valid and runs every process through the same CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "CONVEYOR_TOKEN_PEPPER": "compose-test-pepper-000",
    "CONVEYOR_FLOWER_PASSWORD": "compose-test-password-0",
    "POSTGRES_PASSWORD": "composetest",
    "CONVEYOR_METRICS_TOKEN": "compose-test-metrics-00",
}


@pytest.fixture(scope="module")
def compose() -> str:
    tool = shutil.which("docker-compose")
    if tool is None:  # `make test` installs it when it can (root with apt)
        pytest.skip("docker-compose is not installed and could not be installed")
    return tool


def _config(
    compose: str, *args: str, env: dict[str, str] = ENV
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [compose, "config", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_compose_file_validates_with_every_service(compose: str) -> None:
    result = _config(compose, "--services")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {
        "postgres",
        "redis",
        "migrate",
        "web",
        "worker",
        "beat",
        "flower",
        "exporter",
        "prometheus",
        "grafana",
    }
    rendered = _config(compose).stdout
    commands = ("web", "worker", "beat", "flower", "exporter")
    for command in (f"conveyor {name}" for name in commands):
        assert command in rendered.replace("\n    - ", " ").replace("- ", "")


def test_compose_refuses_to_start_without_secrets(compose: str) -> None:
    result = _config(compose, "-q", env={"PATH": ENV["PATH"]})
    assert result.returncode != 0
    assert "CONVEYOR_TOKEN_PEPPER" in result.stderr or "POSTGRES_PASSWORD" in result.stderr
