import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; the flag is read when triton is
# first imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mquant.models.tiny import write_tiny
from mquant.models.vlm import load_pretrained

FAMILIES = ["qwen2_vl", "llava"]


@pytest.fixture(autouse=True)
def _quiet_and_deterministic():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    dirs = {f: write_tiny(f, root / f, seed=0) for f in FAMILIES}
    # A composed LLaVA of another tower and decoder (tests/test_compositions.py covers every pair).
    dirs["llava-dinov2"] = write_tiny("llava", root / "llava-dinov2", seed=0, tower="dinov2", decoder="qwen2")
    return dirs


@pytest.fixture(scope="session")
def model_dirs(tiny_dirs):
    """The tiny models plus the embedded trained one (a Qwen2-VL with real weights)."""
    from mquant.zoo import EMBEDDED_MODEL

    return {**tiny_dirs, "embedded": EMBEDDED_MODEL}


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_vlm(tiny_dirs, family):
    return load_pretrained(tiny_dirs[family])


@pytest.fixture(autouse=True, scope="session")
def _kernel_choices_in_a_temporary_cache(tmp_path_factory):
    """The CPU kernel table (measured once per machine) lives in the session's temporary directory,
    not the user's cache."""
    from mquant.runtime import cpu_kernels

    table = cpu_kernels.KernelTable(tmp_path_factory.mktemp("kernels") / "table.json")
    original, cpu_kernels.kernel_table = cpu_kernels.kernel_table, lambda: table
    yield
    cpu_kernels.kernel_table = original
