import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py
sys.path.insert(0, str(Path(__file__).parent.parent))  # cli.py, evals/
# Subprocesses the tests start (the CLI, torchrun ranks) import this checkout's package too, not whichever copy an
# editable install points at (another worktree)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))

# The tests (and the CLI subprocesses they start) keep cached pass-1 measurements in a directory of their own,
# never the user's cache; set before compressor.assets reads it.
CACHE = tempfile.mkdtemp(prefix="moe-compressor-test-cache-")
os.environ["MOE_COMPRESSOR_CACHE"] = CACHE


@pytest.fixture(scope="session", autouse=True)
def own_cache():
    yield
    shutil.rmtree(CACHE, ignore_errors=True)

@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~10x faster than oversubscribed threads on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
