"""tpssm: tensor-parallel inference of selective state-space models (Mamba, Falcon-Mamba, Mamba-2,
Zamba, Zamba2).

Importing the package loads the compiled extension, which registers the ops under
torch.ops.tpssm; python/tpssm/ops.py holds their typed wrappers and fake implementations.
"""

import torch  # noqa: F401  (loads libtorch and libnccl before the extension)

from tpssm import _C  # noqa: F401  (registers torch.ops.tpssm.*)

__version__ = "0.1.0"


def has_cuda_kernels() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.tpssm.has_cuda_kernels())

from tpssm import ops  # noqa: E402,F401  (typed wrappers and fake implementations)
from tpssm import qallreduce  # noqa: E402,F401  (quantized all-reduce; registers its fakes)
