"""Alembic environment: runs the migrations on the connection that `service.store.engine`
hands over in `config.attributes` (autointerp configures Alembic from Python, no alembic.ini).

SQLite uses batch mode so that ALTERs become table rebuilds, letting the same migration
files run on SQLite and PostgreSQL.
"""

from alembic import context
from sqlalchemy import Connection

from service.store.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through `autointerp db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
