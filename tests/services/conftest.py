"""Fixtures shared by the service tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services.pg import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """PostgreSQL 16 + pgvector on 127.0.0.1, one per test session (``.dsn`` to connect).

    Shared: tests that write to it clean up after themselves, or use names of their own.
    Tests that stop the database start a :class:`PostgresServer` of their own instead.
    """
    with PostgresServer() as server:
        yield server
