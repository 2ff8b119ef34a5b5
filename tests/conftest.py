from __future__ import annotations

import pytest

from tests.harness import Pki


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path)


@pytest.fixture(scope="session")
def pg():
    """A private PostgreSQL server for the whole test session (tests/pg_server.py)."""
    from tests.pg_server import pg_server

    with pg_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg) -> str:
    """The DSN of a fresh, empty PostgreSQL database for one test."""
    return pg.new_database()
