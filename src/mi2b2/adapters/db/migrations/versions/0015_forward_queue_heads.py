"""the forward scheduler reads the heads of the queues: an index in queue order per destination and project

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 10:00:00

A forward tick read every scheduled forward; it now reads per destination and
project only the forwards it can start (or a batch of those it ends), along
this index.
"""

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_requests_forward_queue', 'requests',
                    ['destination_id', 'state', 'kind', 'project_id', sa.text('priority DESC'), 'created_at', 'id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_requests_forward_queue', table_name='requests')
