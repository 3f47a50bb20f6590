"""dataset format names up to 32 characters: openai_preference (17) did not fit the 16 of files.validated_format
and dataset_validations.dataset_format

Revision ID: 0007_longer_dataset_formats
Revises: 0006_checkpoint_metrics
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_longer_dataset_formats"
down_revision = "0006_checkpoint_metrics"
branch_labels = None
depends_on = None

COLUMNS = (("files", "validated_format"), ("dataset_validations", "dataset_format"))


def upgrade() -> None:
    for table, column in COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=16), type_=sa.String(length=32))


def downgrade() -> None:
    for table, column in COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(column, existing_type=sa.String(length=32), type_=sa.String(length=16))
