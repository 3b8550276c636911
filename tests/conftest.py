"""Shared test set-up: one torch thread, a fixed seed and a clean Pyro parameter store for every test."""

import os

import pyro
import pytest
import torch

# The networks under test are tiny: a second thread only adds hand-off cost (also in subprocesses).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    torch.manual_seed(0)
    pyro.clear_param_store()
