"""the scheduler reads the heads of the queues: an index in queue order, waiting reasons per project and PACS,
receivers' heartbeats, and indexes for the request log's keyset pages

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 02:30:00

A scheduled retrieval's waiting reason was written on its row by every tick;
it is now derived when read from the (PACS, project) row in queue_reasons and
the request's own state. The requests' stored reasons stay (forwards and
one-off events such as "requeued" still use them).
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('queue_reasons',
    sa.Column('pacs_id', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pacs_id', 'project_id', name=op.f('pk_queue_reasons'))
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='worker', nullable=False))
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index('ix_requests_project_state')
        batch_op.create_index('ix_requests_project_id', ['project_id', 'id'], unique=False)
        batch_op.create_index('ix_requests_project_state_id', ['project_id', 'state', 'id'], unique=False)
    op.create_index('ix_requests_queue', 'requests',
                    ['pacs_id', 'project_id', 'state', 'kind', sa.text('priority DESC'), 'created_at', 'id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_requests_queue', table_name='requests')
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_index('ix_requests_project_state_id')
        batch_op.drop_index('ix_requests_project_id')
        batch_op.create_index('ix_requests_project_state', ['project_id', 'state'], unique=False)
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_column('kind')
    op.drop_table('queue_reasons')
