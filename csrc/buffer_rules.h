// The rules every op binding checks on its tensor arguments (host only: no device access, no
// synchronisation):
//  - no buffer an op writes may share a byte with itself, with a tensor it reads or with another
//    buffer it writes. The kernels read and write concurrently, so an alias gives wrong results,
//    and an index tensor overwritten by an output sends the kernels' accesses anywhere;
//  - no argument may require grad while grad mode is on. The ops write their results in place
//    and have no backward: a graph through them would give wrong gradients without a word.
#pragma once

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

namespace tpssm {

// One tensor argument of an op; t is null when an optional argument is absent.
struct NamedTensor {
  const at::Tensor* t;
  const char* name;
};

inline NamedTensor named(const at::Tensor& t, const char* name) { return {&t, name}; }
inline NamedTensor named(const std::optional<at::Tensor>& t, const char* name) {
  return {t.has_value() ? &*t : nullptr, name};
}

// Conservative: tensors on one device overlap when their byte ranges [first element, last
// element] intersect, whatever storage object holds them (from_dlpack / from_numpy views of one
// buffer are separate storages). Column slices of one buffer interleave and count as overlapping.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto range = [](const at::Tensor& t) {
    const char* begin = static_cast<const char*>(t.data_ptr());
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    return std::make_pair(begin, begin + (last + 1) * t.element_size());
  };
  const auto [a0, a1] = range(a);
  const auto [b0, b1] = range(b);
  return a0 < b1 && b0 < a1;
}

// Conservative: taken by increasing stride, each dimension's stride must reach past the extent of
// the dimensions before it. A stride of 0 (an expanded tensor) fails, and so does any layout where
// two indices can name one element; a few interleaved layouts that do not overlap fail too.
inline bool may_overlap_itself(const at::Tensor& t) {
  if (t.numel() == 0) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims with size > 1
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // elements spanned by the dims taken so far
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return true;
    extent += (size - 1) * stride;
  }
  return false;
}

inline void check_buffer_rules(const char* op, std::initializer_list<NamedTensor> written,
                               std::initializer_list<NamedTensor> read) {
  if (at::GradMode::is_enabled()) {
    for (const auto& list : {written, read}) {
      for (const NamedTensor& a : list) {
        TORCH_CHECK(a.t == nullptr || !a.t->requires_grad(), op, ": ", a.name,
                    " requires grad; tpssm ops have no backward (call them under torch.no_grad()"
                    " or torch.inference_mode(), or pass tensors that do not require grad)");
      }
    }
  }
  for (auto w = written.begin(); w != written.end(); ++w) {
    if (w->t == nullptr) continue;
    TORCH_CHECK(!may_overlap_itself(*w->t), op, ": ", w->name,
                " must not overlap itself (taken by increasing stride, each dim's stride must "
                "reach past the extent of the dims before it), got shape ",
                w->t->sizes(), " and strides ", w->t->strides());
    auto check = [&](const NamedTensor& other) {
      if (other.t == nullptr) return;
      TORCH_CHECK(!may_overlap(*w->t, *other.t), op, ": ", w->name, " must not overlap ",
                  other.name, " (in-place use is not supported)");
    };
    for (auto o = w + 1; o != written.end(); ++o) check(*o);
    for (const NamedTensor& r : read) check(r);
  }
}

}  // namespace tpssm
