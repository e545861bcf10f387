"""Tensor-parallel language models loaded from Hugging Face checkpoints: Mamba, Falcon-Mamba and
Mamba-2 (tpssm.models.model.SSMForCausalLM) and the hybrids Zamba and Zamba2
(tpssm.models.hybrid.HybridForCausalLM), each family registered in tpssm.models.registry.
Entry points: load_model(path, ctx), model.allocate_cache, model.forward / model.decode, and
tpssm.generate.generate (tpssm.engine.CachedModel binds a model and its cache for the
continuous-batching engine)."""

from tpssm.models.config import FAMILIES, SSMConfig  # noqa: F401
from tpssm.models.kernels import BACKENDS, get_backend  # noqa: F401
from tpssm.models.mixers import BatchMeta, Mamba1Mixer, Mamba2Mixer  # noqa: F401
from tpssm.models.model import CausalLM, RMSNorm, SSMBlock, SSMForCausalLM  # noqa: F401
from tpssm.models.registry import load_config, parse_config  # noqa: F401
from tpssm.models.weights import DictSource, SafetensorsSource, WeightSource  # noqa: F401


def load_model(path, ctx=None, **kwargs) -> CausalLM:
    """The model of any registered family from a local Hugging Face checkpoint directory (see
    CausalLM.from_pretrained for the keyword arguments)."""
    return CausalLM.from_pretrained(path, ctx, **kwargs)


def build_model(config, ctx=None, dtype=None, **kwargs) -> CausalLM:
    """An unloaded model of config's family (fill it with model.load_weights(source))."""
    import torch

    from tpssm.models import registry

    return registry.model_class(config)(config, ctx, dtype or torch.float32, **kwargs)
