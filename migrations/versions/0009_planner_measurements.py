"""planner measurements: each succeeded job's measured peak beside the planner's prediction, with what
determines the error (GPU model, driver, library versions, architecture, method, optimizer, phase at peak),
so the planner can correct itself per (GPU model, recipe family)

Revision ID: 0009_planner_measurements
Revises: 0008_oom_recovery
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009_planner_measurements"
down_revision = "0008_oom_recovery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "planner_measurements",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("gpu_model", sa.String(length=255), nullable=False),
        sa.Column("driver", sa.String(length=64), nullable=True),
        sa.Column(
            "library_versions",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("architecture", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("optimizer", sa.String(length=64), nullable=False),
        sa.Column("family", sa.String(length=128), nullable=False),
        sa.Column("phase_at_peak", sa.String(length=32), nullable=True),
        sa.Column("predicted_peak_bytes", sa.BigInteger(), nullable=False),
        sa.Column("measured_peak_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("job_id"),
    )
    # The planner's one query: the newest measurements of one (GPU model, family).
    with op.batch_alter_table("planner_measurements", schema=None) as batch_op:
        batch_op.create_index(
            "ix_planner_measurements_gpu_family_created", ["gpu_model", "family", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("planner_measurements", schema=None) as batch_op:
        batch_op.drop_index("ix_planner_measurements_gpu_family_created")
    op.drop_table("planner_measurements")
