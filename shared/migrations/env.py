"""Alembic environment: the URL comes from the Config attribute set by shared.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from shared.models import Base

config = context.config
url = config.attributes["database_url"]

connectable = create_engine(url, poolclass=pool.NullPool)
with connectable.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True)
    with context.begin_transaction():
        # Two processes migrating at once (web and worker started together) would race on
        # CREATE TABLE; a transaction-scoped advisory lock serialises them.
        connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        context.run_migrations()
