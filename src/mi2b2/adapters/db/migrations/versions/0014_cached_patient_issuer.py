"""cached_studies.patient_id_issuer: the Issuer of Patient ID the study's files carry, so that a
de-identified project's screens make the patient pseudonym and date shift from (issuer, PatientID)
as its downloads do

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 09:30:00

NULL means not known yet: a study cached before this revision. The screens read it from one of
the study's cached files the first time they show the study, and store it; "" means the files
carry no issuer.
"""

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cached_studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_id_issuer', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('cached_studies', schema=None) as batch_op:
        batch_op.drop_column('patient_id_issuer')
