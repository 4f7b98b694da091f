import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def _one_intra_op_thread():
    """These tests run many small tensor ops; on the shared 2-core machine, intra-op threads only
    oversubscribe the CPUs (measured 25x slower under load). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
