"""Fixtures for the store tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.sql import SQL, Identifier


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """``postgres_url`` with a schema of this test's own, dropped afterwards, so tests
    are independent of each other and of anyone else using the database."""
    schema = f"berthd_t_{uuid.uuid4().hex[:12]}"
    separator = "&" if "?" in postgres_url else "?"
    yield f"{postgres_url}{separator}schema={schema}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))
