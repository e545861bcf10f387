"""Pure-PyTorch references of every tpssm op (`<op>_ref`): the test oracle and benchmark baseline."""

from tpssm.reference.ssm import (  # noqa: F401
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
    softplus_ref,
)
from tpssm.reference.qallreduce import (  # noqa: F401
    exact_all_reduce_ref,
    fp16_all_reduce_ref,
    qar_all_reduce_ref,
    qar_chunk_bytes,
    qar_dequant_ref,
    qar_layout,
    qar_quantize_pack_ref,
    qar_reduce_requant_ref,
    qar_wire_bytes,
)
from tpssm.reference.norm import (  # noqa: F401,E402
    add_rms_norm_ref,
    gated_rms_norm_ref,
    gated_sum_squares_ref,
)
from tpssm.reference.attention import decode_attention_ref  # noqa: F401,E402
from tpssm.reference.linear import gemv_conv_update_ref, gemv_ref  # noqa: F401,E402
