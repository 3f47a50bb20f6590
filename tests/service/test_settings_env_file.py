"""Settings come from the environment and from `.env` in the working directory; the environment wins."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

ENV_FILE = """\
# a comment, and a name that is not ours
FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT=7
FTJOBS_LOG_LEVEL=DEBUG
FTJOBS_DATABASE_URL=postgresql://from-the-file/ftjobs
OTHER_TOOL_SETTING=1
"""


def test_settings_read_dotenv_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(ENV_FILE)
    monkeypatch.chdir(tmp_path)
    for name in ("FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT", "FTJOBS_LOG_LEVEL", "FTJOBS_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.max_active_jobs_per_tenant, settings.log_level) == (7, "DEBUG")
    assert settings.database_url == "postgresql://from-the-file/ftjobs"


def test_the_environment_overrides_dotenv(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(ENV_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT", raising=False)
    monkeypatch.delenv("FTJOBS_DATABASE_URL", raising=False)
    monkeypatch.setenv("FTJOBS_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("DATABASE_URL", "postgresql://from-the-environment/ftjobs")  # the unprefixed alias too
    settings = Settings()
    assert (settings.log_level, settings.max_active_jobs_per_tenant) == ("WARNING", 7)
    assert settings.database_url == "postgresql://from-the-environment/ftjobs"


def test_without_dotenv_the_defaults_hold(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT", raising=False)
    assert not Path(".env").exists() and Settings().max_active_jobs_per_tenant == 10


def test_env_example_names_real_settings():
    """Every FTJOBS_ name in .env.example is a setting (a typo there would be ignored silently)."""
    example = Path(__file__).parents[2] / ".env.example"
    names = [
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in example.read_text().splitlines()
        if "=" in line and line.lstrip("# ").startswith("FTJOBS_")
    ]
    assert len(names) >= 8
    fields = {f"FTJOBS_{name.upper()}" for name in Settings.model_fields}
    assert set(names) <= fields, set(names) - fields
