"""Running the Alembic migrations from code: `ftjobs db upgrade`, the embedded stack and the tests."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config

from service.settings import Settings


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("migrations")))
    config.set_main_option("sqlalchemy.url", settings.sqlalchemy_url.replace("%", "%%"))
    return config


def upgrade_database(settings: Settings, revision: str = "head") -> None:
    if settings.sqlalchemy_url.startswith("sqlite"):
        settings.resolved_home.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
