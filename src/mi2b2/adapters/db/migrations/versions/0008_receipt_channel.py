"""requests: the receiver's write failure and the C-MOVE a retrieval sent, in columns of their own

Until now the receiver marked "could not write to the cache" by putting 0xA700
into requests.last_status, and retrieval read that back. A processing
retrieval carrying that mark keeps its meaning: its last_error becomes its
write_failure.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 23:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

OUT_OF_RESOURCES = 0xA700


def upgrade() -> None:
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('write_failure', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('write_failed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('move_message_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('move_destination_ae', sa.String(length=16), nullable=True))
    # Only a processing retrieval's 0xA700 came from the receiver; an ended or
    # backed-off request's last_status is what the PACS or destination said.
    op.execute(sa.text(
        "UPDATE requests SET write_failure = COALESCE(last_error, 'cannot write to the cache'), "
        "write_failed_at = COALESCE(started_at, created_at) "
        "WHERE kind = 'retrieve' AND state = 'processing' AND last_status = :status"
    ).bindparams(status=OUT_OF_RESOURCES))


def downgrade() -> None:
    op.execute(sa.text(
        "UPDATE requests SET last_status = :status, last_error = write_failure "
        "WHERE kind = 'retrieve' AND state = 'processing' AND write_failure IS NOT NULL"
    ).bindparams(status=OUT_OF_RESOURCES))
    with op.batch_alter_table('requests', schema=None) as batch_op:
        batch_op.drop_column('move_destination_ae')
        batch_op.drop_column('move_message_id')
        batch_op.drop_column('write_failed_at')
        batch_op.drop_column('write_failure')
