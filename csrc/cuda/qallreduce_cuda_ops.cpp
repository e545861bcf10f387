// CUDA implementations of the quantized all-reduce ops: the three kernels, the loopback op (N
// simulated ranks on one GPU, the exchange done by device copies) and the fused op on the
// extension's own NCCL communicator. Validate, guard, fill params, launch on the current stream.
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <nccl.h>
#include <torch/library.h>

#include "kernels/qallreduce_kernels.h"
#include "buffer_rules.h"
#include "qallreduce_ops.h"

#define TPSSM_NCCL_CHECK(cmd)                                                              \
  do {                                                                                     \
    const ncclResult_t tpssm_nccl_res = (cmd);                                             \
    TORCH_CHECK(tpssm_nccl_res == ncclSuccess, "NCCL call ", #cmd, " failed: ",            \
                ncclGetErrorString(tpssm_nccl_res));                                       \
  } while (0)

#define TPSSM_CUDA_CHECK(cmd)                                                              \
  do {                                                                                     \
    const cudaError_t tpssm_cuda_err = (cmd);                                              \
    TORCH_CHECK(tpssm_cuda_err == cudaSuccess, "CUDA call ", #cmd, " failed: ",            \
                cudaGetErrorString(tpssm_cuda_err));                                       \
  } while (0)

namespace tpssm {

namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void qar_quantize_pack_cuda(const at::Tensor& x, int64_t world_size, int64_t group_size,
                            int64_t codec, const at::Tensor& send) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto p = make_qar_quantize_pack_params(x, world_size, group_size, codec, send);
  run_qar_quantize_pack(p, c10::cuda::getCurrentCUDAStream());
}

void qar_reduce_requant_cuda(const at::Tensor& recv, int64_t numel, int64_t world_size,
                             int64_t group_size, int64_t codec, const at::Tensor& mine) {
  check_cuda(recv, "recv");
  const c10::cuda::CUDAGuard guard(recv.device());
  const auto p = make_qar_reduce_params(recv, numel, world_size, group_size, codec, mine);
  run_qar_reduce_requant(p, c10::cuda::getCurrentCUDAStream());
}

void qar_dequant_cuda(const at::Tensor& gathered, int64_t world_size, int64_t group_size,
                      int64_t codec, const std::optional<at::Tensor>& residual,
                      const at::Tensor& out) {
  check_cuda(out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto p = make_qar_dequant_params(gathered, world_size, group_size, codec, residual, out);
  run_qar_dequant(p, c10::cuda::getCurrentCUDAStream());
}

void qar_loopback_cuda(const at::Tensor& xs, int64_t group_size, int64_t codec,
                       const std::optional<at::Tensor>& residual, const at::Tensor& send,
                       const at::Tensor& recv, const at::Tensor& mine, const at::Tensor& gathered,
                       const at::Tensor& out) {
  check_cuda(xs, "xs");
  const c10::cuda::CUDAGuard guard(xs.device());
  const QarLayout l =
      check_qar_loopback_args(xs, group_size, codec, residual, send, recv, mine, gathered, out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = l.world_size, cb = l.chunk_bytes;
  const int64_t rank_bytes = l.numel * xs.element_size();
  const DType dtype = qar_dtype(xs, "xs");
  const QarCodec c = static_cast<QarCodec>(codec);
  uint8_t* send_p = send.data_ptr<uint8_t>();
  uint8_t* recv_p = recv.data_ptr<uint8_t>();
  uint8_t* mine_p = mine.data_ptr<uint8_t>();
  uint8_t* gath_p = gathered.data_ptr<uint8_t>();
  if (cb == 0) return;
  for (int64_t r = 0; r < n; ++r) {
    run_qar_quantize_pack(
        {dtype, c, l, static_cast<const uint8_t*>(xs.data_ptr()) + r * rank_bytes,
         send_p + r * n * cb},
        stream);
  }
  // The all-to-all: owner k receives chunk k of every rank's send buffer, in rank order.
  for (int64_t k = 0; k < n; ++k) {
    TPSSM_CUDA_CHECK(cudaMemcpy2DAsync(recv_p + k * n * cb, cb, send_p + k * cb, n * cb, cb, n,
                                       cudaMemcpyDeviceToDevice, stream));
    run_qar_reduce_requant({c, l, recv_p + k * n * cb, mine_p + k * cb}, stream);
  }
  const void* res = residual.has_value() ? residual->data_ptr() : nullptr;
  for (int64_t r = 0; r < n; ++r) {
    TPSSM_CUDA_CHECK(cudaMemcpyAsync(gath_p + r * n * cb, mine_p, n * cb,
                                     cudaMemcpyDeviceToDevice, stream));
    run_qar_dequant({dtype, c, l, gath_p + r * n * cb, res,
                     static_cast<uint8_t*>(out.data_ptr()) + r * rank_bytes},
                    stream);
  }
}

// ---------------------------------------------------------------------------------------------
// The extension's own NCCL communicators, addressed by an integer handle (index in a registry).

struct QarComm {
  ncclComm_t comm = nullptr;
  int rank = 0;
  int world_size = 1;
  int device = 0;
};

std::mutex g_comms_mutex;
std::vector<std::unique_ptr<QarComm>> g_comms;

QarComm& lookup_comm(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_comms_mutex);
  TORCH_CHECK(handle >= 0 && handle < static_cast<int64_t>(g_comms.size()) &&
                  g_comms[handle] != nullptr,
              "handle must name a live communicator from qar_nccl_init, got ", handle);
  return *g_comms[handle];
}

at::Tensor qar_nccl_unique_id() {
  ncclUniqueId id;
  TPSSM_NCCL_CHECK(ncclGetUniqueId(&id));
  at::Tensor t = at::empty({static_cast<int64_t>(sizeof(id.internal))},
                           at::TensorOptions().dtype(at::kByte));
  std::memcpy(t.data_ptr<uint8_t>(), id.internal, sizeof(id.internal));
  return t;
}

// Joins the communicator on the current CUDA device; blocks until every rank has joined.
int64_t qar_nccl_init(const at::Tensor& unique_id, int64_t rank, int64_t world_size) {
  ncclUniqueId id;
  TORCH_CHECK(unique_id.scalar_type() == at::kByte && unique_id.device().is_cpu() &&
                  unique_id.is_contiguous() &&
                  unique_id.numel() == static_cast<int64_t>(sizeof(id.internal)),
              "unique_id must be a contiguous CPU uint8 tensor of ", sizeof(id.internal),
              " bytes (from qar_nccl_unique_id), got ", unique_id.scalar_type(), " ",
              unique_id.sizes(), " on ", unique_id.device());
  TORCH_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, "rank must be in [0, world_size), got ", rank);
  std::memcpy(id.internal, unique_id.data_ptr<uint8_t>(), sizeof(id.internal));
  auto c = std::make_unique<QarComm>();
  TPSSM_CUDA_CHECK(cudaGetDevice(&c->device));
  c->rank = static_cast<int>(rank);
  c->world_size = static_cast<int>(world_size);
  TPSSM_NCCL_CHECK(ncclCommInitRank(&c->comm, c->world_size, id, c->rank));
  std::lock_guard<std::mutex> lock(g_comms_mutex);
  g_comms.push_back(std::move(c));
  return static_cast<int64_t>(g_comms.size()) - 1;
}

// Blocks until every CUDA graph that captured work of this communicator is destroyed (NCCL >=
// 2.26 waits for them): callers release such graphs first.
void qar_nccl_destroy(int64_t handle) {
  QarComm& c = lookup_comm(handle);
  TPSSM_NCCL_CHECK(ncclCommDestroy(c.comm));
  std::lock_guard<std::mutex> lock(g_comms_mutex);
  g_comms[handle].reset();
}

// quantize -> grouped send/recv -> reduce-requantize -> all-gather -> dequantize, all enqueued on
// the current stream: no host synchronisation and no allocation, so it can be captured in a CUDA
// graph. Every rank must call it with the same shapes, in the same order.
void qar_nccl_all_reduce(int64_t handle, const at::Tensor& x, int64_t group_size, int64_t codec,
                         const std::optional<at::Tensor>& residual, const at::Tensor& send,
                         const at::Tensor& recv, const at::Tensor& mine,
                         const at::Tensor& gathered, const at::Tensor& out) {
  const QarComm& c = lookup_comm(handle);
  check_cuda(x, "x");
  TORCH_CHECK(x.device().index() == c.device, "x must be on the communicator's device cuda:",
              c.device, ", got ", x.device());
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must have the shape and dtype of x (", x.sizes(), ", ", x.scalar_type(),
              "), got (", out.sizes(), ", ", out.scalar_type(), ")");
  for (const at::Tensor* t : {&send, &recv, &mine, &gathered, &out}) {
    TORCH_CHECK(t->device() == x.device(), "send, recv, mine, gathered and out must be on the "
                "device of x (", x.device(), "), got ", t->device());
  }
  check_buffer_rules("qar_nccl_all_reduce",
                     {named(send, "send"), named(recv, "recv"), named(mine, "mine"),
                      named(gathered, "gathered"), named(out, "out")},
                     {named(x, "x"), named(residual, "residual")});
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = c.world_size;
  const auto qp = make_qar_quantize_pack_params(x, n, group_size, codec, send);
  const auto rp = make_qar_reduce_params(recv, x.numel(), n, group_size, codec, mine);
  const auto dp = make_qar_dequant_params(gathered, n, group_size, codec, residual, out);
  const size_t cb = static_cast<size_t>(qp.layout.chunk_bytes);
  if (cb == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  run_qar_quantize_pack(qp, stream);
  TPSSM_NCCL_CHECK(ncclGroupStart());
  // The group is always closed before any error is raised: NCCL's group depth is per thread, and
  // a group left open would silently swallow every later NCCL call of this thread (torch's
  // process group included) into a group that never launches - a hang instead of an error.
  ncclResult_t p2p = ncclSuccess;
  for (int r = 0; r < n && p2p == ncclSuccess; ++r) {
    p2p = ncclSend(qp.send + r * cb, cb, ncclUint8, r, c.comm, stream);
    if (p2p == ncclSuccess) {
      p2p = ncclRecv(recv.data_ptr<uint8_t>() + r * cb, cb, ncclUint8, r, c.comm, stream);
    }
  }
  const ncclResult_t group_end = ncclGroupEnd();
  TORCH_CHECK(p2p == ncclSuccess, "NCCL ncclSend/ncclRecv of the all-to-all failed: ",
              ncclGetErrorString(p2p), " (", ncclGetLastError(c.comm), ")");
  TORCH_CHECK(group_end == ncclSuccess, "NCCL ncclGroupEnd of the all-to-all failed: ",
              ncclGetErrorString(group_end), " (", ncclGetLastError(c.comm), ")");
  run_qar_reduce_requant(rp, stream);
  TPSSM_NCCL_CHECK(ncclAllGather(mine.data_ptr<uint8_t>(), gathered.data_ptr<uint8_t>(), cb,
                                 ncclUint8, c.comm, stream));
  run_qar_dequant(dp, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(tpssm, CUDA, m) {
  m.impl("qar_quantize_pack", &qar_quantize_pack_cuda);
  m.impl("qar_reduce_requant", &qar_reduce_requant_cuda);
  m.impl("qar_dequant", &qar_dequant_cuda);
  m.impl("qar_loopback", &qar_loopback_cuda);
  m.impl("qar_nccl_all_reduce", &qar_nccl_all_reduce);
}

// No tensor argument (or a CPU one) to dispatch on: registered for every backend.
TORCH_LIBRARY_IMPL(tpssm, CompositeExplicitAutograd, m) {
  m.impl("qar_nccl_unique_id", &qar_nccl_unique_id);
  m.impl("qar_nccl_init", &qar_nccl_init);
  m.impl("qar_nccl_destroy", &qar_nccl_destroy);
}

}  // namespace tpssm
