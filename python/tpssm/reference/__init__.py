"""Pure-PyTorch references of every tpssm op (`<op>_ref`): the test oracle and benchmark baseline."""

from tpssm.reference.ssm import (  # noqa: F401
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
    softplus_ref,
)
