// The memory rule every op binding checks: no buffer an op writes may share a byte with a tensor
// it reads or with another buffer it writes. The kernels read and write concurrently, so an alias
// gives wrong results, and an index tensor overwritten by an output sends the kernels' accesses
// anywhere. Host pointer arithmetic only: no device access, no synchronisation.
#pragma once

#include <initializer_list>
#include <optional>
#include <utility>

#include <ATen/core/Tensor.h>
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

// Conservative: tensors in one storage overlap when their byte ranges [first element, last
// element] intersect. Column slices of one buffer interleave and count as overlapping.
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
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

inline void check_written_disjoint(const char* op, std::initializer_list<NamedTensor> written,
                                   std::initializer_list<NamedTensor> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    if (w->t == nullptr) continue;
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
