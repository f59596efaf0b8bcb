"""scheduler cursors are keyed by kind (PACS or destination) and target id

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 23:00:00

Forwards kept their round-robin cursors in the retrieval scheduler's table,
under the key "@" + destination id in the pacs_id column ("@" cannot start a
PACS id). Each row now says what it turns over: ("pacs", PACS id) or
("destination", destination id). Downgrading writes the "@" keys back.
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

DESTINATION_PREFIX = "@"


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("select pacs_id, last_project_id from scheduler_cursors")).all()
    op.drop_table('scheduler_cursors')
    table = op.create_table('scheduler_cursors',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('target_id', sa.String(length=64), nullable=False),
    sa.Column('last_project_id', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('kind', 'target_id', name=op.f('pk_scheduler_cursors'))
    )
    converted = [
        {"kind": "destination", "target_id": key[len(DESTINATION_PREFIX):], "last_project_id": last}
        if key.startswith(DESTINATION_PREFIX) else {"kind": "pacs", "target_id": key, "last_project_id": last}
        for key, last in rows
    ]
    if converted:
        op.bulk_insert(table, converted)


def downgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text("select kind, target_id, last_project_id from scheduler_cursors")).all()
    op.drop_table('scheduler_cursors')
    table = op.create_table('scheduler_cursors',
    sa.Column('pacs_id', sa.String(length=64), nullable=False),
    sa.Column('last_project_id', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('pacs_id', name=op.f('pk_scheduler_cursors'))
    )
    restored = [
        {"pacs_id": DESTINATION_PREFIX + target if kind == "destination" else target, "last_project_id": last}
        for kind, target, last in rows
    ]
    if restored:
        op.bulk_insert(table, restored)
