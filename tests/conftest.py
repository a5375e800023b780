import os

import pytest
import torch

# at most 2 threads; fewer when OMP_NUM_THREADS says so (benchmarks/mutation.py runs one thread per mutant)
torch.set_num_threads(min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2)))

ASSETS = os.path.join(os.path.dirname(__file__), "..", "avatarforcing", "assets")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
