"""Shared fixtures: a seeded generator and the float dtypes (tolerances: ep_kernels.testing.RTOL)."""
import pytest
import torch





@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs, reproducible."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread_module():
    """Tiny tensors: intra-op threads only cost (and spin under load). Restored afterwards.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread_module")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_backend_env(monkeypatch):
    """Run a test without EP_KERNELS_BACKEND from the caller's environment."""
    monkeypatch.delenv("EP_KERNELS_BACKEND", raising=False)


# Triton kernels run under the Triton interpreter on machines without a GPU (docs/design.md,
# "Choosing a backend"); the variable must be set before ep_kernels.triton defines its kernels, which
# happens on the first use of the 'triton' backend (never at collection).
import os  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
