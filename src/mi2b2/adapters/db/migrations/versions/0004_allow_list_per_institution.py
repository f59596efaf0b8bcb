"""allow-list entries are (institution, MRN); institutions carry their MRN format and issuer

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 20:05:00

Existing entries were bare MRNs. For a project that reaches one institution
they are that institution's MRNs, and are kept as such. For a project that
reaches several, nobody can tell which institution issued an MRN, so its
entries are dropped: the project fails closed (no patient is allowed) until
the server re-syncs the allow-lists from the configuration, which it does at
every start and reload, and which now refuses an ambiguous one-list form.
Downgrading keeps one row per (project, MRN), losing the institution.
"""

import json

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def _institutions(value: object) -> list[str]:
    if isinstance(value, str):
        value = json.loads(value)
    return [str(v) for v in value] if isinstance(value, list) else []


def upgrade() -> None:
    # In place, not a batch (copy-and-move) on SQLite: departments refer to institutions.
    op.add_column('institutions', sa.Column('settings', sa.JSON(), nullable=False, server_default=sa.text("'{}'")))

    connection = op.get_bind()
    reached = {pid: _institutions(inst) for pid, inst in connection.execute(sa.text("select id, institutions from projects"))}
    rows = connection.execute(sa.text("select project_id, mrn from project_mrns")).all()
    op.drop_table('project_mrns')
    table = op.create_table('project_mrns',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('institution_id', sa.String(length=64), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['institution_id'], ['institutions.id'], name=op.f('fk_project_mrns_institution_id_institutions')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_project_mrns_project_id_projects')),
    sa.PrimaryKeyConstraint('project_id', 'institution_id', 'mrn', name=op.f('pk_project_mrns'))
    )
    known = {i for (i,) in connection.execute(sa.text("select id from institutions"))}
    kept = [
        {"project_id": project_id, "institution_id": reached[project_id][0], "mrn": mrn}
        for project_id, mrn in rows
        if len(reached.get(project_id, [])) == 1 and reached[project_id][0] in known
    ]
    if kept:
        op.bulk_insert(table, kept)


def downgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("select distinct project_id, mrn from project_mrns")).all()
    op.drop_table('project_mrns')
    table = op.create_table('project_mrns',
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('mrn', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_project_mrns_project_id_projects')),
    sa.PrimaryKeyConstraint('project_id', 'mrn', name=op.f('pk_project_mrns'))
    )
    if rows:
        op.bulk_insert(table, [{"project_id": p, "mrn": m} for p, m in rows])
    # In place, as in upgrade(); SQLite drops a column in place since 3.35.
    op.execute("ALTER TABLE institutions DROP COLUMN settings")
