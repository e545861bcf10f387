// Whether a CUDA op reads its index tensors back on the host to check their values
// (TPSSM_DEBUG_CHECKS=1, see ssm_ops.h). Not while the stream is being captured into a CUDA graph:
// the read is a synchronisation capture forbids, and a graph replays with other values than
// those present at capture, so a check then would prove nothing. The kernels' own range checks
// keep every access in bounds either way.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "ssm_ops.h"

namespace tpssm {

inline bool index_values_checked_on_host(const at::Tensor& on_device) {
  if (!cuda_index_values_checked_on_host()) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(
      c10::cuda::getCurrentCUDAStream(on_device.device().index()).stream(), &status));
  return status == cudaStreamCaptureStatusNone;
}

}  // namespace tpssm
