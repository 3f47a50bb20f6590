"""The migrations build an empty PostgreSQL and an empty SQLite database, and agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from service.migrate import upgrade_database
from service.models import Base

TABLES = {
    "jobs",
    "job_events",
    "job_attempts",
    "job_checkpoints",
    "files",
    "gpus",
    "tenants",
    "api_keys",
    "idempotency_keys",
    "webhook_deliveries",
    "webhook_attempts",
    "sweeps",
    "sweep_trials",
    "alembic_version",
}


def _diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_postgres_built_by_migrations_matches_the_models(database):
    assert _diff(database) == []
    engine = create_engine(database)
    assert TABLES <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_empty_sqlite_upgrades_and_matches_the_models(settings, tmp_path):
    embedded = settings.model_copy(update={"database_url": None, "home": tmp_path})
    upgrade_database(embedded)
    assert TABLES <= set(inspect(create_engine(embedded.sqlalchemy_url)).get_table_names())
    assert _diff(embedded.sqlalchemy_url) == []


def test_downgrade_to_base_and_back(settings, tmp_path):
    from alembic import command

    from service.migrate import alembic_config

    embedded = settings.model_copy(update={"database_url": None, "home": tmp_path})
    upgrade_database(embedded)
    command.downgrade(alembic_config(embedded), "base")
    assert set(inspect(create_engine(embedded.sqlalchemy_url)).get_table_names()) == {"alembic_version"}
    upgrade_database(embedded)


def test_readiness_waits_for_the_migrations(settings, tmp_path):
    from fastapi.testclient import TestClient

    from service.app import create_app

    embedded = settings.model_copy(update={"database_url": None, "redis_url": None, "home": tmp_path})
    with TestClient(create_app(embedded)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and "db upgrade" in response.json()["checks"]["database"]
        upgrade_database(embedded)
        assert client.get("/readyz").json() == {
            "status": "ready",
            "checks": {"database": "ok", "broker": "ok", "storage": "ok"},
        }
