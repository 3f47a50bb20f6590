"""an index per job list filter, and datasets validated once

The single-column ix_jobs_status and ix_jobs_tenant_id are prefixes of the new (status, seq) and
(tenant_id, seq) indexes, which serve every query they did.

Revision ID: 0004_list_indexes_validations
Revises: 0003_tenants_and_keys
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_list_indexes_validations"
down_revision = "0003_tenants_and_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_status_seq", ["status", "seq"], unique=False)
        batch_op.create_index("ix_jobs_tenant_id_seq", ["tenant_id", "seq"], unique=False)
        batch_op.create_index("ix_jobs_tenant_id_status_seq", ["tenant_id", "status", "seq"], unique=False)
        batch_op.drop_index("ix_jobs_status")
        batch_op.drop_index("ix_jobs_tenant_id")
    op.create_table(
        "dataset_validations",
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.String(length=255), nullable=False),
        sa.Column("dataset_format", sa.String(length=16), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
        sa.Column("validated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("url", "size_bytes", "version", "dataset_format"),
    )


def downgrade() -> None:
    op.drop_table("dataset_validations")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_tenant_id", ["tenant_id"], unique=False)
        batch_op.create_index("ix_jobs_status", ["status"], unique=False)
        batch_op.drop_index("ix_jobs_tenant_id_status_seq")
        batch_op.drop_index("ix_jobs_tenant_id_seq")
        batch_op.drop_index("ix_jobs_status_seq")
