"""Governed searches: query leases and pacing per PACS, background search jobs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 20:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('query_leases',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('pacs_id', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('granted', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_query_leases'))
    )
    op.create_index('ix_query_leases_pacs_expires', 'query_leases', ['pacs_id', 'expires_at'], unique=False)
    op.create_table('query_pacers',
    sa.Column('pacs_id', sa.String(length=64), nullable=False),
    sa.Column('bucket', sa.BigInteger(), nullable=True),
    sa.Column('used', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('pacs_id', name=op.f('pk_query_pacers'))
    )
    op.create_table('search_jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_login', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('pacs_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('done', sa.Integer(), nullable=False),
    sa.Column('screened', sa.JSON(), nullable=False),
    sa.Column('waiting_reason', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('worker', sa.String(length=128), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_search_jobs'))
    )
    op.create_index('ix_search_jobs_state', 'search_jobs', ['state'], unique=False)
    op.create_table('search_job_items',
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('value', sa.String(length=128), nullable=False),
    sa.Column('done', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['search_jobs.id'], name=op.f('fk_search_job_items_job_id_search_jobs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'position', name=op.f('pk_search_job_items'))
    )
    op.create_table('search_job_parts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('first_position', sa.Integer(), nullable=False),
    sa.Column('query_id', sa.Integer(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['search_jobs.id'], name=op.f('fk_search_job_parts_job_id_search_jobs'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_search_job_parts'))
    )
    op.create_index(op.f('ix_search_job_parts_job_id'), 'search_job_parts', ['job_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_search_job_parts_job_id'), table_name='search_job_parts')
    op.drop_table('search_job_parts')
    op.drop_table('search_job_items')
    op.drop_index('ix_search_jobs_state', table_name='search_jobs')
    op.drop_table('search_jobs')
    op.drop_table('query_pacers')
    op.drop_index('ix_query_leases_pacs_expires', table_name='query_leases')
    op.drop_table('query_leases')
