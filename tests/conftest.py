"""Shared test set-up: a fixed seed and a clean Pyro parameter store for every test."""

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    torch.manual_seed(0)
    pyro.clear_param_store()
