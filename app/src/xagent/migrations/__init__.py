"""Alembic migrations shipped inside the package (run by ``xagent-bootstrap migrate``)."""
