import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py
sys.path.insert(0, str(Path(__file__).parent.parent))  # cli.py, evals/




@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~10x faster than oversubscribed threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
