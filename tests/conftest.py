"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (finite differences and closed forms),
    restored afterwards so that other modules see float32 as users do."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
