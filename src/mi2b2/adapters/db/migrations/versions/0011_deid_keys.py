"""deid_keys and deid_mappings: per-project pseudonym secrets and the honest broker's mapping

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'deid_keys',
        sa.Column('project_id', sa.String(length=64), nullable=False),
        sa.Column('secret', sa.String(length=128), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_deid_keys_project_id_projects')),
        sa.PrimaryKeyConstraint('project_id', name=op.f('pk_deid_keys')),
    )
    op.create_table(
        'deid_mappings',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('project_id', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('original', sa.String(length=200), nullable=False),
        sa.Column('pseudonym', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_deid_mappings_project_id_projects')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_deid_mappings')),
        sa.UniqueConstraint('project_id', 'kind', 'original', name=op.f('uq_deid_mappings_project_id')),
    )


def downgrade() -> None:
    op.drop_table('deid_mappings')
    op.drop_table('deid_keys')
