"""deid_uids: a de-identified project's pseudonymous Study, Series and SOP Instance UIDs -> cached originals,
so that DICOMweb and the viewer can serve a URL that names a pseudonym

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 06:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'deid_uids',
        sa.Column('project_id', sa.String(length=64), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('pseudonym', sa.String(length=64), nullable=False),
        sa.Column('original', sa.String(length=64), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_deid_uids_project_id_projects')),
        sa.PrimaryKeyConstraint('pseudonym', 'project_id', 'level', name=op.f('pk_deid_uids')),
    )
    op.create_index('ix_deid_uids_original', 'deid_uids', ['original', 'project_id', 'level'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_deid_uids_original', table_name='deid_uids')
    op.drop_table('deid_uids')
