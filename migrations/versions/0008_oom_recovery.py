"""OOM recovery: the spec the caller asked for, kept once a recovery changes what runs, and how many
recoveries the job has used

Revision ID: 0008_oom_recovery
Revises: 0007_longer_dataset_formats
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008_oom_recovery"
down_revision = "0007_longer_dataset_formats"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "requested_spec",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("oom_recoveries", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("oom_recoveries")
        batch_op.drop_column("requested_spec")
