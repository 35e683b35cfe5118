import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops (one-token decode steps): one thread avoids oversubscribing a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
