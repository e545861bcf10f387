// Device-side helpers of the selective_scan launch plan (ScanPlan, ssm_kernels.h), shared by its
// two kernel families: the recurrent kernels (selective_scan.cu) and the chunked SSD kernel of the
// Mamba2 form (ssd_scan.cu). Both use the same split plan and workspace layout, so the
// state-combine pass serves both. Internal to csrc/kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_utils.cuh"
#include "ssm_kernels.h"
#include "ssm_params.h"

namespace tpssm {

// The slot a sequence reads / writes, or false when the row must be skipped entirely.
__device__ __forceinline__ bool resolve_slot(const SelectiveScanParams& p, int64_t b,
                                             int64_t& slot, bool& initial) {
  slot = p.cache_indices ? p.cache_indices[b] : b;
  if (p.cache_indices && slot == p.pad_slot_id) return false;
  // Out-of-range slots cannot be rejected without a host sync: skip instead of touching memory
  // outside the pool.
  if (p.ssm_states && (slot < 0 || slot >= p.num_slots)) return false;
  initial = p.ssm_states && p.has_initial_state && p.has_initial_state[b];
  return true;
}

// The tokens and sequences one block of an output pass visits: piece j of the split plan (any
// number of sequences, the first possibly continuing from piece j - 1), else sequence j.
struct OutputPiece {
  int64_t begin, end;       // flat token range
  int64_t b_first, b_last;  // candidate sequences, in order
  bool last;                // the plan's last piece (it also takes trailing empty sequences)

  // False from the first sequence that belongs to a later piece: one starting past the end, or
  // at the end unless this is the last piece.
  __device__ __forceinline__ bool visits(int64_t seq_begin) const {
    return seq_begin < end || (seq_begin == end && last);
  }
};

__device__ __forceinline__ OutputPiece output_piece(const SelectiveScanParams& p,
                                                    const ScanPlan& plan, const SeqView& seqs,
                                                    int64_t j) {
  OutputPiece r;
  if (plan.flat) {
    r.begin = j * plan.chunk_len;
    r.end = min(r.begin + plan.chunk_len, plan.total_tokens);
    r.b_first = seqs.first_in_chunk(r.begin);
    r.b_last = p.batch - 1;
  } else {
    r.begin = seqs.begin(j);
    r.end = seqs.end(j);
    r.b_first = r.b_last = j;
  }
  r.last = !plan.flat || j == plan.num_chunks - 1;
  return r;
}

// Where a sequence's state comes from when an output pass starts its part of piece j.
enum class StartState {
  kCarried,         // it began in an earlier piece: the combined state H_{j-1} (ws_S)
  kCopiedInitial,   // it begins here and continues past the piece: its initial state as the
                    // state pass copied it (ws_I), since the piece holding its end writes the slot
  kSlot,            // it begins and ends here with an initial state: the slot itself
  kZero,
};

__device__ __forceinline__ StartState start_state(const OutputPiece& piece, int64_t seq_begin,
                                                  int64_t seq_end, bool initial) {
  if (seq_begin < piece.begin) return StartState::kCarried;
  if (seq_end > piece.end) return StartState::kCopiedInitial;
  return initial ? StartState::kSlot : StartState::kZero;
}

// What the split plan's state pass does for piece j: scan the part [max(seq_begin, begin), end)
// of the sequence b that holds the piece's last token when that sequence continues past it.
// flag (ws_flags): 0 nothing to carry, 1 the carry starts in this piece (from the initial state
// when `initial`, copied to ws_I), 2 it continues from an earlier piece.
struct StatePiece {
  int64_t begin, end;
  int64_t b, seq_begin;
  int64_t slot;
  bool initial;
  int32_t flag;
};

__device__ __forceinline__ StatePiece state_piece(const SelectiveScanParams& p,
                                                  const ScanPlan& plan, const SeqView& seqs,
                                                  int64_t j) {
  StatePiece r;
  r.begin = j * plan.chunk_len;
  r.end = min(r.begin + plan.chunk_len, plan.total_tokens);
  r.b = seqs.seq_of(r.end - 1);
  r.seq_begin = seqs.begin(r.b);
  r.slot = 0;
  r.initial = false;
  r.flag = 0;
  if (seqs.end(r.b) > r.end && resolve_slot(p, r.b, r.slot, r.initial)) {
    r.flag = r.seq_begin >= r.begin ? 1 : 2;
  }
  return r;
}

// The SSD kernel covers the Mamba2 form with 16-bit activations, headdim 64 / 128 and dstate
// 64 / 128 on sm_80 and later (mma.sync with 16-bit operands).
bool ssd_supported(const SelectiveScanParams& p);

// One pass of the SSD kernel over the plan's grid (plan.flat: one block per (piece, head), else
// one per (sequence, head)). state_pass: the split plan's first pass (end states of the pieces
// whose sequence continues past them); otherwise the output pass.
void launch_ssd_pass(const SelectiveScanParams& p, const ScanPlan& plan, bool state_pass,
                     cudaStream_t stream);

}  // namespace tpssm
