"""login_failures: failed logins counted per (login, client address), not per account

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 20:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('login_failures',
    sa.Column('login_digest', sa.String(length=64), nullable=False),
    sa.Column('client', sa.String(length=64), nullable=False),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_failure', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('login_digest', 'client', name=op.f('pk_login_failures'))
    )
    op.create_index(op.f('ix_login_failures_last_failure'), 'login_failures', ['last_failure'], unique=False)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('last_failed_login')
        batch_op.drop_column('failed_logins')


def downgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('failed_logins', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('last_failed_login', sa.DateTime(timezone=True), nullable=True))
    op.drop_index(op.f('ix_login_failures_last_failure'), table_name='login_failures')
    op.drop_table('login_failures')
