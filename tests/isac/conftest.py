"""Fixtures of the ISAC tests."""

import pytest

from isac_data import planted_stack


@pytest.fixture(scope="session")
def planted():
    return planted_stack()
