"""Model presets at the real dimensions of public checkpoints, and random weights for them.

The command line's `bench --preset` and `demo` run models whose weights nobody needs to download:
`RandomWeightSource` serves every tensor of a Hugging Face-format state dict, generated on demand
from a seed (the same values for every rank and every tp degree, so a tp 2 run computes the same
function as a tp 1 run), through the same slicing interface as a checkpoint on disk.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tpssm.models import registry
from tpssm.models.registry import preset_config
from tpssm.models.weights import WeightSource, concat_ranges

__all__ = ["PRESETS", "DEMO_CONFIG", "preset_config", "RandomWeightSource", "hf_weight_shapes"]

# Every registered family's presets: name -> config.json dictionary (dimensions only).
PRESETS: Dict[str, dict] = registry.presets()

# The demo's small Mamba: big enough that tp 2 has real work to split, small enough for 2 cores.
DEMO_CONFIG = dict(architectures=["MambaForCausalLM"], model_type="mamba", vocab_size=1024,
                   hidden_size=256, num_hidden_layers=4, state_size=16, expand=2, conv_kernel=4,
                   time_step_rank=16, use_bias=False, use_conv_bias=True,
                   tie_word_embeddings=True)


def hf_weight_shapes(config) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor a Hugging Face checkpoint of this config stores."""
    return registry.weight_shapes(config)


_MASK32 = 0xFFFFFFFF


def _chunk(device: torch.device) -> int:
    """Elements generated at once: cache-sized on the CPU, large on a GPU (few launches); it
    also bounds the int64 temporaries."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def _tensor_key(name: str, seed: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & _MASK32


def _uniform(key: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) fp32 values, one per flat position in `index` (int64, < 2**32).

    A counter-based hash (xor-shift / multiply rounds, every product below 2**63), so a value
    depends only on (key, position): a rank generates just the slice it holds, on its own
    device, and gets the same bits as any other rank or device would for that position.
    """
    x = index ^ key
    for mult, shift in ((0x7FEB352D, 15), (0x2C1B3C6D, 12), (0x297A2D39, 15)):
        x.mul_(mult).bitwise_and_(_MASK32)
        x.bitwise_xor_(x >> shift)
    return (x.bitwise_right_shift_(8).to(torch.float32) + 0.5).mul_(2.0 ** -24)  # exact in fp32


def _random_values(name: str, shape: Tuple[int, ...], key: int,
                   index: torch.Tensor) -> torch.Tensor:
    """Tensor `name`'s values at the flat positions `index`: a plausible, numerically tame value
    for each kind of tensor (fp32, on index's device)."""
    u = _uniform(key, index)
    z = (2 * u - 1) * math.sqrt(3.0)  # zero mean, unit variance
    module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
    if name.endswith("A_log"):
        return torch.log(u * 15 + 1)                                       # A in [-16, -1]
    if name.endswith(".D"):
        return 1 + 0.1 * z
    if name.endswith(("dt_proj.bias", "dt_proj_bias", "dt_bias")):
        dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        return dt + torch.log(-torch.expm1(-dt))                           # softplus^-1(dt)
    if module in ("norm", "norm_f", "input_layernorm", "pre_ff_layernorm", "final_layernorm"):
        return 1 + 0.1 * z
    if name.endswith(".bias"):
        return 0.02 * z
    if name.endswith(("embeddings.weight", "embed_tokens.weight", "lm_head.weight")):
        return 0.02 * z
    fan_in = shape[-1] if len(shape) > 1 else 1
    # A product, not a quotient: CUDA divides by a scalar through its reciprocal, the CPU does
    # not, and the two may differ in the last bit; fp32 multiplications agree everywhere.
    return z * (1.0 / math.sqrt(fan_in))


class RandomWeightSource(WeightSource):
    """Every tensor of `config`'s checkpoint, random but reproducible from (seed, name).

    Only the requested rows / columns are generated, directly on `device` (default CPU): sampling
    whole tensors on the CPU would make a GPU rank's load of a 7B preset take over a minute, and
    each rank of tp N generates 1/N of the sharded tensors. The values do not depend on the
    device up to the last bit of the transcendental functions (A, dt, fp32 buffers); ranks on one
    kind of device agree bit for bit.

    `on_generated`, when set, is called with the element count of every generated chunk (load
    progress: on a CPU a large vocabulary's embedding alone takes tens of seconds).
    """

    def __init__(self, config, seed: int = 0,
                 device: Optional[torch.device] = None):
        super().__init__()
        self._shapes = hf_weight_shapes(config)
        for name, shape in self._shapes.items():
            if math.prod(shape) >= 1 << 32:
                raise ValueError(f"{name} has {math.prod(shape)} elements: random weights "
                                 f"index positions with 32 bits")
        self._seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.on_generated: Optional[Callable[[int], None]] = None

    def _generated(self, n: int) -> None:
        if self.on_generated is not None:
            self.on_generated(n)

    def keys(self) -> List[str]:
        return sorted(self._shapes)

    def _key_set(self):
        return self._shapes

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[self._resolve(name)]

    def _rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of dim 0: one contiguous run of flat positions, generated in chunks."""
        shape = self._shapes[name]
        inner = math.prod(shape[1:])
        out = torch.empty((b - a,) + tuple(shape[1:]), dtype=torch.float32, device=self.device)
        flat = out.view(-1)
        key = _tensor_key(name, self._seed)
        chunk = _chunk(self.device)
        for i in range(0, flat.numel(), chunk):
            n = min(chunk, flat.numel() - i)
            index = torch.arange(a * inner + i, a * inner + i + n, dtype=torch.int64,
                                 device=self.device)
            flat[i:i + n] = _random_values(name, shape, key, index)
            self._generated(n)
        return out

    def _cols(self, name: str, a: int, b: int) -> torch.Tensor:
        """Columns [a, b) of a 2-D tensor, a chunk of rows at a time."""
        rows, cols = self._shapes[name]
        out = torch.empty(rows, b - a, dtype=torch.float32, device=self.device)
        key = _tensor_key(name, self._seed)
        step = max(1, _chunk(self.device) // max(1, b - a))
        offsets = torch.arange(a, b, dtype=torch.int64, device=self.device)
        for r in range(0, rows, step):
            r1 = min(rows, r + step)
            index = (torch.arange(r, r1, dtype=torch.int64, device=self.device)[:, None] * cols
                     + offsets[None, :])
            out[r:r1] = _random_values(name, (rows, cols), key, index)
            self._generated((r1 - r) * (b - a))
        return out

    def get(self, name: str) -> torch.Tensor:
        name = self._resolve(name)
        return self._count(self._rows(name, 0, self._shapes[name][0]))

    def get_rows(self, name: str, ranges) -> torch.Tensor:
        name = self._resolve(name)
        return concat_ranges(lambda r: self._count(self._rows(name, *r)), ranges, 0)

    def get_block(self, name: str, index) -> torch.Tensor:
        """Generates the flat positions of the block only (meant for small tensors: the
        position grid of the whole tensor is built)."""
        name = self._resolve(name)
        shape = self._shapes[name]
        pos = torch.arange(math.prod(shape), dtype=torch.int64, device=self.device)
        pos = pos.view(shape)[index].contiguous()
        self._generated(pos.numel())
        return self._count(_random_values(name, shape, _tensor_key(name, self._seed),
                                          pos.view(-1)).view(pos.shape))

    def get_cols(self, name: str, ranges) -> torch.Tensor:
        name = self._resolve(name)
        return concat_ranges(lambda r: self._count(self._cols(name, *r)), ranges, 1)
