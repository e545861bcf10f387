"""Tensor-parallel Mamba, Falcon-Mamba and Mamba-2 language models loaded from Hugging Face
checkpoints. Entry points: SSMForCausalLM.from_pretrained (or load_model), model.allocate_cache,
model.forward / model.decode, and tpssm.generate.generate (tpssm.engine.CachedModel binds a model
and its cache for the continuous-batching engine)."""

from tpssm.models.config import FAMILIES, SSMConfig, load_config, parse_config  # noqa: F401
from tpssm.models.kernels import BACKENDS, get_backend  # noqa: F401
from tpssm.models.mixers import BatchMeta, Mamba1Mixer, Mamba2Mixer  # noqa: F401
from tpssm.models.model import RMSNorm, SSMBlock, SSMForCausalLM  # noqa: F401
from tpssm.models.weights import DictSource, SafetensorsSource, WeightSource  # noqa: F401


def load_model(path, ctx=None, **kwargs) -> SSMForCausalLM:
    """Shorthand for SSMForCausalLM.from_pretrained(path, ctx, **kwargs)."""
    return SSMForCausalLM.from_pretrained(path, ctx, **kwargs)
