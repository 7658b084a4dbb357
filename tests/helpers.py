"""Small shared helpers for tests."""

import numpy as np
import pytest


def relative_error(actual, reference) -> float:
    """max|actual − reference| / max|reference|: the parity metric of the issue targets."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


def assert_close(actual, reference, tol: float, what: str) -> None:
    assert np.shape(actual) == np.shape(reference), f"{what}: shape {np.shape(actual)} vs {np.shape(reference)}"
    err = relative_error(actual, reference)
    assert err <= tol, f"{what}: max|Δ|/max|ref| = {err:.3g} exceeds {tol:g}"


@pytest.fixture(scope="module", autouse=True)
def torch_single_thread():
    """Runs torch on one thread in the test module that imports this fixture (autouse: importing it turns it on):
    on tiny tensors more threads only contend (~10× slower on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
