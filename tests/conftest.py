import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ASSETS = os.path.join(os.path.dirname(__file__), "..", "avatarforcing", "assets")


@pytest.fixture
def seeded():
    torch.manual_seed(0)
