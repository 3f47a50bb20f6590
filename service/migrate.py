"""Running the Alembic migrations from code: `ftjobs db upgrade`, the embedded stack and the tests."""

from __future__ import annotations

from importlib.resources import files

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

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


def pending_migrations(connection: Connection, settings: Settings) -> bool:
    """True while the database is behind the code's newest migration (readiness waits for `db upgrade`)."""
    heads = set(ScriptDirectory.from_config(alembic_config(settings)).get_heads())
    return set(MigrationContext.configure(connection).get_current_heads()) != heads
