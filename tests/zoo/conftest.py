"""Fixtures shared by the zoo tests."""

import pytest

from attnzoo.pallas_kernels.testing import float64


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting afterwards."""
    with float64():
        yield
