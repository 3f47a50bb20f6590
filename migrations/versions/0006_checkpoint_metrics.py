"""metrics on each kept checkpoint (its step's train loss and position, shown where checkpoints are listed), and
a job's validation dataset

Revision ID: 0006_checkpoint_metrics
Revises: 0005_idempotency_webhooks
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_checkpoint_metrics"
down_revision = "0005_idempotency_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_checkpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "metrics", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
            )
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("validation_dataset_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("validation_dataset_url")
    with op.batch_alter_table("job_checkpoints", schema=None) as batch_op:
        batch_op.drop_column("metrics")
