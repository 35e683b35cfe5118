import pytest
from helpers import INTERPRET


@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a Triton kernel test runs on CPU (see helpers.triton_interpreted)."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
