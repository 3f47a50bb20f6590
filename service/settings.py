"""The one settings object. Every process reads its configuration here and nowhere else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FTJOBS_", extra="ignore")

    home: Path = Field(Path(".ftjobs"), description="Where the embedded database, broker, uploads and artifacts live")
    # DATABASE_URL and REDIS_URL are honoured unprefixed too, as docker-compose and most PaaS set them.
    database_url: str | None = Field(None, validation_alias=AliasChoices("FTJOBS_DATABASE_URL", "DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=AliasChoices("FTJOBS_REDIS_URL", "REDIS_URL"))

    data_root: Path | None = Field(None, description="Datasets given by path are resolved under this directory")
    # base_model resolves only inside these directories (':'-separated, as PATH) and the Hugging Face cache;
    # unset: FTJOBS_HOME/models. The API never reads a model directory anywhere else.
    model_roots: str | None = None
    max_upload_bytes: int = Field(100 * 1024 * 1024, ge=1)
    # A job spec is a few KiB; this leaves room for long metadata while a huge body is cut off as it streams.
    max_json_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_dataset_bytes: int = Field(1024**3, ge=1, description="Datasets given by path are refused above this")
    max_dataset_rows: int = Field(1_000_000, ge=1)
    # Requests per API key per rate_limit_window_seconds (fixed window, counted in Redis when there is one).
    rate_limit_requests: int = Field(600, ge=1)
    rate_limit_window_seconds: int = Field(60, ge=1)
    # Queued + running + cancelling jobs per tenant, unless its own limit is set (`ftjobs keys create`).
    max_active_jobs_per_tenant: int = Field(10, ge=1)
    api_key: str | None = Field(None, description="The key the CLI sends; else FTJOBS_HOME/api-key")
    # Origins allowed to call the API from a browser, comma-separated; empty: no CORS headers at all.
    cors_origins: str = ""
    queue_name: str = "training"
    # Redis redelivers unacknowledged tasks after this long; see worker/celery_app.py for the ack policy.
    visibility_timeout_seconds: int = 3600
    cancel_poll_seconds: float = 1.0
    # Attempts in all for a job whose training process dies without a result or fails with a retryable error.
    max_attempts: int = Field(3, ge=1)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    log_level: str = "INFO"
    log_json: bool = False
    # Each worker serves its own Prometheus /metrics on this port (0 = none); one port per worker on a host.
    worker_metrics_port: int = 9101
    # Loopback by default: the worker's metrics are for a local scraper, not for the network.
    worker_metrics_host: str = "127.0.0.1"

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            # psycopg 3 is the driver we ship; a plain postgresql:// URL would ask for psycopg2.
            return self.database_url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
                "postgres://", "postgresql+psycopg://", 1)
        return f"sqlite:///{self.resolved_home / 'ftjobs.db'}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"sqla+sqlite:///{self.resolved_home / 'broker.db'}"

    @property
    def datasets_root(self) -> Path:
        return (self.data_root or self.resolved_home / "data").expanduser().resolve()

    @property
    def uploads_dir(self) -> Path:
        return self.resolved_home / "files"

    @property
    def artifacts_dir(self) -> Path:
        return self.resolved_home / "artifacts"

    @property
    def model_root_dirs(self) -> list[Path]:
        if not self.model_roots:
            return [self.resolved_home / "models"]
        return [Path(root).expanduser().resolve() for root in self.model_roots.split(":") if root]

    @property
    def api_key_file(self) -> Path:
        return self.resolved_home / "api-key"

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def ensure_dirs(self) -> None:
        for path in (self.resolved_home, self.datasets_root, self.uploads_dir, self.artifacts_dir,
                     *self.model_root_dirs[:1]):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
