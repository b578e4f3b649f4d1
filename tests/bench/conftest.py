"""Tests in this folder run single-threaded (see the one_thread fixture in tests/conftest.py)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
