// Process-wide launch settings shared by the op bindings (which set them) and the kernel
// launchers (which read them). Torch- and CUDA-free, so the CPU-only build compiles it too.
#pragma once

#include <atomic>

namespace tpssm {

// Programmatic dependent launch of the decode-step kernels (add_rms_norm, gated_rms_norm,
// causal_conv1d_update, selective_state_update, gemv) on sm_90+: each may be scheduled while the
// kernel before it in the stream is still running, and waits for it (griddepcontrol.wait)
// before its first access of memory; before that it only computes addresses and prefetches its
// weights into L2. Off by default (tpssm.ops.set_programmatic_launch).
inline std::atomic<bool>& programmatic_launch_setting() {
  static std::atomic<bool> enabled{false};
  return enabled;
}

}  // namespace tpssm
