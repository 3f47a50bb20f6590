"""The one settings object. Every process reads its configuration here and nowhere else."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = ".env"


class Settings(BaseSettings):
    # The environment first, then `.env` in the working directory (as docker compose and most tools read it);
    # a name set in both is the environment's. The file's other names are ignored, as the environment's are.
    model_config = SettingsConfigDict(
        env_prefix="FTJOBS_", extra="ignore", env_file=ENV_FILE, env_file_encoding="utf-8"
    )

    home: Path = Field(Path(".ftjobs"), description="Where the embedded database, broker, uploads and artifacts live")
    # DATABASE_URL and REDIS_URL are honoured unprefixed too, as docker-compose and most PaaS set them.
    database_url: str | None = Field(None, validation_alias=AliasChoices("FTJOBS_DATABASE_URL", "DATABASE_URL"))
    redis_url: str | None = Field(None, validation_alias=AliasChoices("FTJOBS_REDIS_URL", "REDIS_URL"))

    # Uploads, datasets given by path, checkpoints and artifacts all live under this one location, so the API and
    # workers on different machines see the same files: a local directory (also an NFS or ReadWriteMany mount)
    # or s3://bucket/prefix (service/storage.py). Unset: FTJOBS_HOME/storage.
    storage_url: str | None = None
    # An S3-compatible endpoint other than AWS (MinIO, Ceph, moto); credentials come from the usual AWS_* variables.
    s3_endpoint_url: str | None = None
    data_root: str | None = Field(
        None,
        description="Datasets given by path are resolved under this URL or "
        "directory (default: the storage location's data/)",
    )
    # Where a worker stages a job's dataset and checkpoints on its own disk. Unset: FTJOBS_HOME/work.
    worker_dir: Path | None = None
    # A worker without a GPU runs jobs on the CPU: this many slots, each a gloo rank of a sharded job (num_gpus
    # of them) or one single-process job.
    cpu_ranks: int = Field(1, ge=1, le=64)
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
    url: str | None = Field(None, description="The API the CLI talks to; else http://{api_host}:{api_port}")
    # Origins allowed to call the API from a browser, comma-separated; empty: no CORS headers at all.
    cors_origins: str = ""
    queue_name: str = "training"
    # Redis redelivers unacknowledged tasks after this long; see worker/celery_app.py for the ack policy.
    visibility_timeout_seconds: int = 3600
    cancel_poll_seconds: float = 1.0
    # Attempts in all, across workers, for a job whose worker or training process is lost or drained.
    max_attempts: int = Field(3, ge=1)
    # A job that runs out of memory is re-planned and resumed as a new attempt this many times (planner/recovery.py)
    # before it fails with out_of_memory; these attempts do not count against max_attempts.
    max_oom_recoveries: int = Field(2, ge=0, le=8)
    # A CPU worker's job processes get this address-space limit (RLIMIT_AS), so they run out of memory for real;
    # ignored on a GPU. None: no limit.
    job_memory_limit_bytes: int | None = Field(None, gt=0)
    # A running attempt holds a lease that its worker renews every lease_renew_seconds while training goes on;
    # once it has expired, any worker's reconciler hands the job to a new attempt (service/jobs/reconcile.py).
    lease_seconds: float = 60.0
    lease_renew_seconds: float | None = Field(None, description="default: a third of lease_seconds")
    # A process frozen inside a transaction (SIGSTOP, a paused VM, a partition) keeps its row locks, and the
    # reconciler skips locked rows: PostgreSQL ends a worker's session left idle in a transaction this long, so
    # the locks of a lost worker never outlive its lease. A worker's transactions are a few statements, no waits;
    # the API's engine goes without (service/db.py make_api_engine).
    idle_in_transaction_seconds: float | None = Field(None, gt=0, description="default: half of lease_seconds")
    # A job queued this long with no message left for it in the broker is sent again (a restarted Redis,
    # an API killed between its commit and its send).
    requeue_grace_seconds: float = 30.0
    reconcile_interval_seconds: float = 10.0
    # On SIGTERM a worker asks the running job to checkpoint and waits this long before stopping it anyway.
    drain_seconds: float = 120.0
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Processes `ftjobs api` runs (`ftjobs up` always one). WEB_CONCURRENCY is honoured too, as uvicorn and most
    # PaaS read it. Each holds its own database pool: the README says how many per core.
    api_workers: int = Field(1, ge=1, validation_alias=AliasChoices("FTJOBS_API_WORKERS", "WEB_CONCURRENCY"))
    # uvicorn's one log line per request; turn it off when a load balancer or Prometheus already counts them.
    access_log: bool = True
    # Each API process runs its database work in api_threads threads with a pool of as many connections, so a
    # request never waits for a connection while holding a thread (service/db.py). Fewer threads than that
    # only queue requests, in the event loop, at no cost; many more contend for the GIL on a small machine.
    api_threads: int = Field(16, ge=1, le=256)
    # Only to spare PostgreSQL connections (max_connections is shared by every process): below api_threads,
    # requests may wait for a connection, up to db_pool_timeout_seconds, then answer 503 database_busy.
    api_db_pool_size: int | None = Field(None, ge=1)
    db_pool_timeout_seconds: float = Field(3.0, gt=0)
    # A query of the API that runs longer than this is cancelled by PostgreSQL and answered 503 database_busy,
    # so a locked table or a stalled server never holds requests (and their threads) forever.
    api_statement_timeout_seconds: float = Field(10.0, gt=0)
    # Connections are replaced after this long instead of pinged before every use; a connection that died
    # anyway fails its first statement, which a read retries and a write answers 503 (service/db.py).
    db_pool_recycle_seconds: int = Field(1800, ge=1)
    # Progress events of a job that ended this long ago are deleted by the reconciler; state changes and
    # checkpoints are kept. 0 keeps everything.
    progress_event_retention_days: float = Field(30.0, ge=0)
    # An Idempotency-Key's first response is replayed for this long (Stripe's 24 h), per tenant. A first request
    # that holds its key this long without finishing (its API process died) lets a retry take the key over.
    idempotency_key_hours: float = Field(24.0, gt=0)
    idempotency_lock_seconds: float = Field(60.0, gt=0)
    # Webhooks (service/webhooks): each worker looks for due deliveries this often and POSTs up to
    # webhook_concurrency at once, each bounded by webhook_timeout_seconds; a failed one is retried after
    # base * 4^(n-1) seconds, at most webhook_retry_max_seconds, webhook_max_attempts times in all.
    webhook_poll_seconds: float = Field(1.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_concurrency: int = Field(4, ge=1, le=64)
    webhook_retry_base_seconds: float = Field(5.0, gt=0)
    webhook_retry_max_seconds: float = Field(3600.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    # GET /v1/jobs/{id}/events as Server-Sent Events: each stream reads the job's new events this often (one
    # short query, no connection held between), and one API process serves at most sse_max_streams at once.
    sse_poll_seconds: float = Field(1.0, gt=0)
    sse_max_streams: int = Field(200, ge=1)
    log_level: str = "INFO"
    log_json: bool = False
    # Each worker serves its own Prometheus /metrics on this port (0 = none); one port per worker on a host.
    worker_metrics_port: int = 9101
    # Loopback by default: the worker's metrics are for a local scraper, not for the network.
    worker_metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _lease_outlasts_its_renewal(self) -> Settings:
        if not 0 < self.renew_seconds < self.lease_seconds:
            raise ValueError(
                f"need lease_seconds ({self.lease_seconds}) > lease_renew_seconds ({self.renew_seconds}) > 0"
            )
        if self.requeue_grace_seconds <= 0 or self.reconcile_interval_seconds <= 0 or self.drain_seconds <= 0:
            raise ValueError("requeue_grace_seconds, reconcile_interval_seconds and drain_seconds must be > 0")
        return self

    @property
    def api_pool_size(self) -> int:
        return self.api_db_pool_size or self.api_threads

    @property
    def renew_seconds(self) -> float:
        return self.lease_renew_seconds if self.lease_renew_seconds is not None else self.lease_seconds / 3

    @property
    def idle_in_transaction_timeout(self) -> float:
        return self.idle_in_transaction_seconds or self.lease_seconds / 2

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or str(self.resolved_home / "storage")

    @property
    def resolved_data_root(self) -> str:
        return self.data_root or self.resolved_storage_url.rstrip("/") + "/data"

    @property
    def resolved_worker_dir(self) -> Path:
        return (self.worker_dir or self.resolved_home / "work").expanduser().resolve()

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            # psycopg 3 is the driver we ship; a plain postgresql:// URL would ask for psycopg2.
            return self.database_url.replace("postgresql://", "postgresql+psycopg://", 1).replace(
                "postgres://", "postgresql+psycopg://", 1
            )
        return f"sqlite:///{self.resolved_home / 'ftjobs.db'}"

    @property
    def broker_url(self) -> str:
        return self.redis_url or f"sqla+sqlite:///{self.resolved_home / 'broker.db'}"

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
        """The local directories this process writes: the home, the first model root, and local storage (an S3
        URL needs none)."""
        for path in (self.resolved_home, *self.model_root_dirs[:1]):
            path.mkdir(parents=True, exist_ok=True)
        for url in (self.resolved_storage_url, self.resolved_data_root):
            if "://" not in url or url.startswith("file://"):
                Path(url.removeprefix("file://")).expanduser().mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
