import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = os.path.join(os.path.dirname(__file__), "..", "assets")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
