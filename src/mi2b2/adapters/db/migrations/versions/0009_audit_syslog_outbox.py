"""audit_syslog_outbox: ATNA messages queued for the security team's syslog collector;
audit_syslog_sender: the one process delivering them, in order

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_syslog_outbox',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('audit_seq', sa.BigInteger(), nullable=False),
        sa.Column('message', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_syslog_outbox')),
    )
    with op.batch_alter_table('audit_syslog_outbox', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_syslog_outbox_audit_seq'), ['audit_seq'], unique=False)
    sender = op.create_table(
        'audit_syslog_sender',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=128), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_syslog_sender')),
    )
    op.bulk_insert(sender, [{'id': 1, 'holder': None, 'lease_until': None}])


def downgrade() -> None:
    op.drop_table('audit_syslog_sender')
    with op.batch_alter_table('audit_syslog_outbox', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_syslog_outbox_audit_seq'))
    op.drop_table('audit_syslog_outbox')
