"""oidc_logins: OpenID Connect sign-ins in progress; api_tokens.via: how a browser session was opened

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('oidc_logins',
    sa.Column('state_digest', sa.String(length=64), nullable=False),
    sa.Column('browser_digest', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=128), nullable=False),
    sa.Column('code_verifier', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('state_digest', name=op.f('pk_oidc_logins'))
    )
    op.create_index(op.f('ix_oidc_logins_started_at'), 'oidc_logins', ['started_at'], unique=False)
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('via', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_column('via')
    op.drop_index(op.f('ix_oidc_logins_started_at'), table_name='oidc_logins')
    op.drop_table('oidc_logins')
