"""Where a result was made: the versions of embzip, Python and the libraries that compute it, and the CPU.

A fit that reads the model's own sample (`codebook` and `aware` on a causal LM) inherits the sample's chaos: kernels
that round a product differently (bfloat16 on AVX-512 against AMX tiles, another BLAS, another transformers'
attention) draw other tokens, and the factors and their perplexities move as much as another seed moves them.
The same command on the same machine and versions gives the same bytes. So factors files and `bench.json` record
this, and two results that differ can be told apart from a change of code (docs/format.md, docs/method.md).
"""

from __future__ import annotations

import functools
import platform
import sys
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "numpy", "safetensors", "gguf")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # gguf is optional
        return None


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo on Linux, else what platform knows (may be empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def environment() -> dict[str, object]:
    """embzip's, Python's and the computing libraries' versions, the machine and CPU, and whether the CPU multiplies
    bfloat16 in hardware (the model's statistics run in bfloat16 there: models.native_bf16). JSON-ready."""
    from . import __version__
    from .models import native_bf16

    return {
        "embzip": __version__,
        "python": sys.version.split()[0],
        **{name: _version(name) for name in LIBRARIES},
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "native_bf16": native_bf16(),
    }
