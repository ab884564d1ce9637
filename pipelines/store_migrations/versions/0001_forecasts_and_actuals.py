"""The forecast log and the actuals.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forecasts",
        # a log grows by every served step: 64-bit ids (SQLite's rowid is one already)
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("series_id", sa.String(), nullable=False),
        sa.Column("origin", sa.DateTime(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("timestamp", sa.DateTime(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("quantiles", sa.JSON(), nullable=False),
        sa.Column("scale", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    # actuals meet forecasts by (series, timestamp)
    op.create_index("ix_forecasts_series_id_timestamp", "forecasts", ["series_id", "timestamp"])
    op.create_table(
        "actuals",
        sa.Column("series_id", sa.String(), primary_key=True),
        sa.Column("timestamp", sa.DateTime(), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("actuals")
    op.drop_index("ix_forecasts_series_id_timestamp", table_name="forecasts")
    op.drop_table("forecasts")
