import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The quantization tests run many small ops; on a shared, oversubscribed CPU two OpenMP threads make each
    # small op wait for a busy core (10-50x slower). One thread is deterministic and fast here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
