"""Alembic's environment for the forecast store. Migrations run only through
:meth:`pipelines.forecast_store.ForecastStore.open`, on the connection (already in a
transaction, under the migration lock) it passes in ``config.attributes``."""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection,
                  version_table=context.config.attributes["version_table"])
with context.begin_transaction():  # the caller's transaction: Alembic opens none of its own
    context.run_migrations()
