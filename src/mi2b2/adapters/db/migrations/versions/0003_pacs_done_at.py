"""requests.pacs_done_at: a retrieval frees its PACS slot when the PACS has finished sending

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 15:05:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pacs_done_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_column('pacs_done_at')
