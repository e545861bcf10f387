// Host emulation of the few CUDA features the SSM kernels use: one fiber per GPU thread of a
// block, all on the launching host thread (blocks run one after another), warp shuffles through
// per-(warp, mask) barriers that detect missing mask members (deadlock -> error), 16-byte
// accesses that check alignment, and the CUDA grid limits.
//
// Why fibers rather than one std::thread per GPU thread: every barrier is a context switch, and
// kernel-scheduled threads made each one a futex wake-up on a 2-core machine (millions per test).
// A fiber switch is a user-space register swap, and a barrier nobody can complete is found at
// once (every live fiber waits) instead of after a timeout.
//
// One launch runs at a time in the process (emu_launch holds emu_launch_mutex): a launch from
// another host thread waits for it. So the emulation's state - the running fiber's thread and
// block index, the block, the scheduler - lives in plain globals: as thread_locals of this shared
// library each access was a __tls_get_addr call (an intercepted one under AddressSanitizer), in
// a profile of the gemv cases a quarter of the time, and half of it under ASan. __shared__
// arrays, function-local statics here, rely on the same rule.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

using std::max;
using std::min;

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// A barrier: `count` arrivals of the current generation; `gen` moves on when the last one arrives.
struct EmuGroupSync {
  int count = 0;
  long gen = 0;
  float vals[32];
};

// A whole warp's exchange of up to 64 bytes per lane (warp-collective tensor-core operations).
struct EmuWarpExchange {
  int count = 0;
  long gen = 0;
  unsigned char lanes[32][64];
};

struct EmuBlock {
  std::map<std::pair<int, unsigned>, std::unique_ptr<EmuGroupSync>> groups;
  std::map<int, std::unique_ptr<EmuWarpExchange>> exchanges;
  EmuGroupSync block_barrier;           // __syncthreads
  std::vector<unsigned char> dynamic;   // dynamic shared memory (the launch's byte count)
  EmuGroupSync& get(int warp, unsigned mask) {
    auto& p = groups[{warp, mask}];
    if (!p) p.reset(new EmuGroupSync());
    return *p;
  }
  EmuWarpExchange& exchange(int warp) {
    auto& p = exchanges[warp];
    if (!p) p.reset(new EmuWarpExchange());
    return *p;
  }
};

inline uint3 emu_threadIdx;
inline uint3 emu_blockIdx;
inline dim3 emu_blockDim;
inline dim3 emu_gridDim;
inline EmuBlock* emu_block = nullptr;
inline std::mutex emu_err_mutex;
inline std::string emu_error;
inline int emu_sm_count = 132;
inline int emu_max_grid_y = 65535;  // gridDim.y limit (tests lower it to make launchers loop)

inline void emu_fail(const std::string& what) {
  std::lock_guard<std::mutex> l(emu_err_mutex);
  if (emu_error.empty()) emu_error = what;
}

// This GPU thread's cp.async copies (emu_mma.h): issued but not yet committed, and committed
// groups, oldest first. A copy lands in shared memory only when a wait retires its group, and
// its destination reads as NaN-like garbage until then, so a read before the wait shows.
struct EmuAsyncCopy {
  unsigned char* dst;
  const void* src;
  bool valid;
  int bytes;
};
inline std::vector<EmuAsyncCopy> emu_async_open;
inline std::deque<std::vector<EmuAsyncCopy>> emu_async_groups;

// Execution contexts. On x86-64 a switch saves what the ABI has a callee preserve (rbx, rbp,
// r12-r15, the MXCSR and x87 control words) on the current stack and loads the other stack
// pointer: swapcontext also makes a signal-mask system call on every switch, and
// AddressSanitizer clears the shadow of the whole destination stack in its swapcontext
// interceptor (minutes of system time for sanitize.py). Elsewhere, under -fcf-protection (a
// `ret` to an address no `call` pushed breaks shadow stacks; glibc's swapcontext handles them),
// or with EMU_UCONTEXT defined (the shim self-test builds both), ucontext.
#if defined(__x86_64__) && !defined(__CET__) && !defined(EMU_UCONTEXT)
struct EmuContext {
  void* sp = nullptr;
};
extern "C" void emu_context_switch(void** save_sp, void* load_sp);
// Weak and hidden: every translation unit that includes this header emits the same definition,
// one is kept, and it stays inside the shared object.
asm(".pushsection .text\n"
    ".weak emu_context_switch\n"
    ".hidden emu_context_switch\n"
    ".type emu_context_switch, @function\n"
    ".p2align 4\n"
    "emu_context_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size emu_context_switch, .-emu_context_switch\n"
    ".popsection\n");
inline void emu_context_jump(EmuContext& save, const EmuContext& load) {
  emu_context_switch(&save.sp, load.sp);
}
// A context that starts `entry` on the stack [stack, stack + bytes): the control words (the
// caller's, as getcontext would take them) and six registers emu_context_switch loads, then
// `entry` as its return address, placed so that `entry` starts with the stack aligned as after a
// call (rsp = 8 mod 16). `entry` must never return.
inline void emu_context_make(EmuContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  uint32_t words[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(words[0]), "=m"(words[1]));
  std::memcpy(--sp, words, sizeof(words));
  c.sp = sp;
}
#else
struct EmuContext {
  ucontext_t uc;
};
inline void emu_context_jump(EmuContext& save, const EmuContext& load) {
  swapcontext(&save.uc, &load.uc);
}
inline void emu_context_make(EmuContext& c, unsigned char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// One GPU thread of the running block: a fiber with its own stack. A fiber waiting at a barrier
// holds the address of the barrier's generation and the value it saw; it is runnable again once
// the generation has moved on.
struct EmuFiber {
  EmuContext ctx;
  unsigned char* stack = nullptr;
  bool done = false;
  const long* wait_gen = nullptr;
  long seen_gen = 0;
  int* wait_count = nullptr;
  bool released = true;  // false: let go of a barrier that could never complete
  std::vector<EmuAsyncCopy> async_open;
  std::deque<std::vector<EmuAsyncCopy>> async_groups;
};

// The running launch's fibers.
// Stacks are mapped once and reused; a guard page below each turns an overflow into a fault.
struct EmuScheduler {
  static constexpr size_t kStackBytes = size_t{8} << 20;  // a host thread's default
  static constexpr size_t kGuardBytes = size_t{64} << 10;
  EmuContext host;
  std::vector<EmuFiber> fibers;
  int current = -1;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;

  void reserve(unsigned n) {
    while (fibers.size() < n) {
      void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED || mprotect(m, kGuardBytes, PROT_NONE) != 0) {
        throw std::runtime_error("emu: cannot map a fiber stack and its guard");
      }
      fibers.emplace_back();
      fibers.back().stack = static_cast<unsigned char*>(m) + kGuardBytes;
    }
  }
};
inline EmuScheduler emu_sched;
inline std::mutex emu_launch_mutex;

// AddressSanitizer (EMU_ASAN=1) must be told of each stack switch: the destination stack's bounds
// before it, and the fake-stack handle after it. The host stack's bounds are learnt on the first
// switch into a fiber.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
inline const void* emu_host_stack_bottom = nullptr;
inline size_t emu_host_stack_size = 0;
#endif

inline void emu_switch_to_fiber(EmuFiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, f.stack, EmuScheduler::kStackBytes);
  emu_context_jump(emu_sched.host, f.ctx);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  emu_context_jump(emu_sched.host, f.ctx);
#endif
}

// Back to the host context (a fiber waiting at a barrier, or one that finished).
inline void emu_fiber_yield(bool finished) {
  EmuFiber& f = emu_sched.fibers[emu_sched.current];
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, emu_host_stack_bottom,
                                 emu_host_stack_size);
  emu_context_jump(f.ctx, emu_sched.host);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)finished;
  emu_context_jump(f.ctx, emu_sched.host);
#endif
}

inline void emu_fiber_main() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &emu_host_stack_bottom, &emu_host_stack_size);
#endif
  try {
    emu_sched.body(emu_sched.body_arg);
  } catch (const std::exception& e) {
    emu_fail(std::string("exception in a kernel thread: ") + e.what());
  } catch (...) {
    emu_fail("exception in a kernel thread");
  }
  if (!emu_async_open.empty() || !emu_async_groups.empty()) {
    emu_fail("a thread ended with cp.async copies it never waited for");
  }
  emu_sched.fibers[emu_sched.current].done = true;
  emu_fiber_yield(true);  // never resumed
}

// Arrival at a barrier of n members: the last one moves the generation on and yields too, so
// that the members go on in the scheduler's order (usually the last arrival is the last thread
// of a pass, and the next pass runs them all from the first): had it run straight on, the
// threads at either end of a block would run first in both orders. False: the barrier was given
// up because no live thread could complete it.
template <typename Sync>
inline bool emu_arrive(Sync& g, int n) {
  if (++g.count == n) {
    g.count = 0;
    ++g.gen;
    emu_fiber_yield(false);
    return true;
  }
  EmuFiber& f = emu_sched.fibers[emu_sched.current];
  f.wait_gen = &g.gen;
  f.seen_gen = g.gen;
  f.wait_count = &g.count;
  emu_fiber_yield(false);
  return f.released;
}

// EMU_THREAD_ORDER=reverse runs a block's threads, and a launch's blocks, from the last to the
// first: a read of another thread's write with no barrier between them, or of another block's
// write in the same launch, then sees the wrong value in one of the two orders.
inline bool emu_reverse_thread_order() {
  static const bool reverse = [] {
    const char* order = std::getenv("EMU_THREAD_ORDER");
    return order != nullptr && std::string(order) == "reverse";
  }();
  return reverse;
}

// Runs one block's threads as fibers, round robin, each until it waits or ends. When every live
// fiber waits and none can go on, the barriers are given up (emu_arrive returns false, the caller
// reports the deadlock) so that the block still runs to its end.
template <typename Body>
void emu_run_block(unsigned threads, Body& body) {
  EmuScheduler& s = emu_sched;
  const bool reverse = emu_reverse_thread_order();
  s.reserve(threads);
  s.body = [](void* b) { (*static_cast<Body*>(b))(); };
  s.body_arg = &body;
  for (unsigned t = 0; t < threads; ++t) {
    EmuFiber& f = s.fibers[t];
    f.done = false;
    f.wait_gen = nullptr;
    f.released = true;
    f.async_open.clear();
    f.async_groups.clear();
#if defined(__SANITIZE_ADDRESS__)
    // The frames a finished fiber never returned from left their redzones poisoned.
    ASAN_UNPOISON_MEMORY_REGION(f.stack + EmuScheduler::kStackBytes - 16384, 16384);
#endif
    emu_context_make(f.ctx, f.stack, EmuScheduler::kStackBytes, emu_fiber_main);
  }
  unsigned live = threads;
  while (live > 0) {
    bool ran = false;
    for (unsigned i = 0; i < threads; ++i) {
      const unsigned t = reverse ? threads - 1 - i : i;
      EmuFiber& f = s.fibers[t];
      if (f.done) continue;
      if (f.wait_gen != nullptr) {
        if (*f.wait_gen == f.seen_gen) continue;
        f.wait_gen = nullptr;
        f.released = true;
      }
      s.current = static_cast<int>(t);
      emu_threadIdx = make_uint3(t, 0, 0);
      std::swap(emu_async_open, f.async_open);
      std::swap(emu_async_groups, f.async_groups);
      emu_switch_to_fiber(f);
      std::swap(emu_async_open, f.async_open);
      std::swap(emu_async_groups, f.async_groups);
      ran = true;
      if (f.done) --live;
    }
    if (!ran) {
      for (unsigned t = 0; t < threads; ++t) {
        EmuFiber& f = s.fibers[t];
        if (f.done || f.wait_gen == nullptr) continue;
        *f.wait_count = 0;
        f.wait_gen = nullptr;
        f.released = false;
      }
    }
  }
  s.current = -1;
}

// Shuffles that read another lane's value: src(lane) gives the lane read (itself when out of range).
template <typename T, typename Src>
inline T emu_shfl(unsigned mask, T v, Src src_of) {
  static_assert(sizeof(T) == sizeof(float), "32-bit shuffles only");
  const int lane = emu_threadIdx.x & 31;
  const int warp = emu_threadIdx.x >> 5;
  if (!((mask >> lane) & 1u)) { emu_fail("shuffle by a thread outside its mask"); return v; }
  EmuGroupSync& g = emu_block->get(warp, mask);
  const int n = __builtin_popcount(mask);
  std::memcpy(&g.vals[lane], &v, sizeof(T));
  if (!emu_arrive(g, n)) { emu_fail("shuffle deadlock: a mask member never arrived"); return v; }
  const int src = src_of(lane);
  if (!((mask >> src) & 1u)) emu_fail("shuffle reads a lane outside the mask");
  T r;
  std::memcpy(&r, &g.vals[src], sizeof(T));
  if (!emu_arrive(g, n)) emu_fail("shuffle deadlock (second phase)");
  return r;
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu_shfl(mask, v, [&](int lane) {
    const int src = lane ^ lane_mask;
    return (src & ~(width - 1)) != (lane & ~(width - 1)) ? lane : src;
  });
}

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu_shfl(mask, v, [&](int lane) {
    const int src = lane - static_cast<int>(delta);
    return src < (lane & ~(width - 1)) ? lane : src;
  });
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return emu_shfl(mask, v, [&](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); });
}

// __syncthreads: a barrier of every thread of the block (one that exited or never arrives is
// reported as a deadlock).
inline void __syncthreads() {
  if (!emu_arrive(emu_block->block_barrier, static_cast<int>(emu_blockDim.x))) {
    emu_fail("__syncthreads deadlock: a thread of the block never arrived");
  }
}

// Every lane of the (full) warp contributes `bytes` bytes; returns all 32 contributions in lane
// order. The second barrier keeps a fast lane's next exchange from overwriting the buffer early.
inline void emu_warp_all_gather(const void* mine, size_t bytes, void* all) {
  const int lane = emu_threadIdx.x & 31;
  const int warp = emu_threadIdx.x >> 5;
  EmuWarpExchange& x = emu_block->exchange(warp);
  std::memcpy(x.lanes[lane], mine, bytes);
  if (!emu_arrive(x, 32)) { emu_fail("warp-collective operation without the whole warp"); return; }
  {
    for (int i = 0; i < 32; ++i) std::memcpy(static_cast<unsigned char*>(all) + i * bytes, x.lanes[i], bytes);
  }
  if (!emu_arrive(x, 32)) emu_fail("warp-collective operation without the whole warp (second phase)");
}

// The running block's dynamic shared memory.
inline unsigned char* emu_dynamic_smem() { return emu_block->dynamic.data(); }

// __syncwarp(mask): a barrier of the mask's lanes (a member that never arrives is reported).
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  const int lane = emu_threadIdx.x & 31;
  const int warp = emu_threadIdx.x >> 5;
  if (!((mask >> lane) & 1u)) { emu_fail("__syncwarp by a thread outside its mask"); return; }
  if (!emu_arrive(emu_block->get(warp, mask), __builtin_popcount(mask))) {
    emu_fail("__syncwarp deadlock: a mask member never arrived");
  }
}

// A vector access of sizeof(Raw) bytes (uint4 / uint2), alignment checked.
template <typename Raw, typename T>
inline Raw emu_ld(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(Raw) != 0) emu_fail("misaligned vector load");
  Raw r;
  std::memcpy(&r, p, sizeof(Raw));
  return r;
}
template <typename Raw, typename T>
inline Raw& emu_st(T* p) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(Raw) != 0) emu_fail("misaligned vector store");
  return *reinterpret_cast<Raw*>(p);
}

template <typename... KArgs, typename... Args>
void emu_launch(void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > static_cast<unsigned>(emu_max_grid_y) ||
      grid.z > 65535 || block.x * block.y * block.z > 1024) {
    throw std::runtime_error("emu: invalid launch configuration");
  }
  std::tuple<std::decay_t<KArgs>...> params(args...);
  std::lock_guard<std::mutex> one_launch_at_a_time(emu_launch_mutex);
  emu_gridDim = grid;
  emu_blockDim = block;
  // Blocks one after another; under EMU_THREAD_ORDER=reverse from the last to the first too, so
  // that a block reading what another block of the same launch writes sees it in one order only.
  const bool reverse = emu_reverse_thread_order();
  const auto in_order = [reverse](unsigned i, unsigned n) { return reverse ? n - 1 - i : i; };
  for (unsigned zi = 0; zi < grid.z; ++zi)
    for (unsigned yi = 0; yi < grid.y; ++yi)
      for (unsigned xi = 0; xi < grid.x; ++xi) {
        const unsigned x = in_order(xi, grid.x), y = in_order(yi, grid.y), z = in_order(zi, grid.z);
        EmuBlock blk;
        // NaN-like garbage, as uninitialised shared memory would be.
        blk.dynamic.assign(smem_bytes, 0xff);
        emu_blockIdx = make_uint3(x, y, z);
        emu_block = &blk;
        auto body = [&] { std::apply(k, params); };
        emu_run_block(block.x, body);
      }
  if (!emu_error.empty()) throw std::runtime_error("emu: " + emu_error);
}

// launch_programmatic's cudaLaunchKernelEx: the same emulated launch (blocks and kernels run one
// after another, so programmatic serialization changes nothing here); launches carrying the
// attribute are counted for tests (take_programmatic_launches).
inline std::atomic<int64_t> emu_programmatic_launches{0};
template <typename... KArgs, typename... Args>
cudaError_t emu_launch_ex(const cudaLaunchConfig_t* cfg, void (*k)(KArgs...), Args&&... args) {
  for (unsigned i = 0; i < cfg->numAttrs; ++i) {
    if (cfg->attrs[i].id == cudaLaunchAttributeProgrammaticStreamSerialization &&
        cfg->attrs[i].val.programmaticStreamSerializationAllowed) {
      ++emu_programmatic_launches;
    }
  }
  emu_launch(k, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cfg->stream,
             std::forward<Args>(args)...);
  return cudaSuccess;
}
#define cudaLaunchKernelEx emu_launch_ex

// Blocks run one after another, so a function-local static is one block's shared memory.
#undef __shared__
#define __shared__ static
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#define cudaGetLastError() cudaSuccess
// Device -1: an id outside the launchers' per-device attribute caches, so that set_sm_count takes
// effect from one call to the next.
#define cudaGetDevice(p) (*(p) = -1, cudaSuccess)
// An sm_90 device (H100) with emu_sm_count multiprocessors.
inline int emu_device_attribute(cudaDeviceAttr a) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: return emu_sm_count;
    case cudaDevAttrComputeCapabilityMajor: return 9;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return 227 * 1024;
    case cudaDevAttrMaxGridDimY: return emu_max_grid_y;
    default: emu_fail("emu: device attribute not emulated"); return 0;
  }
}
#define cudaDeviceGetAttribute(p, a, d) (*(p) = emu_device_attribute(a), cudaSuccess)
#define cudaFuncSetAttribute(f, a, v) cudaSuccess
// Every emulated kernel counts as compiled for sm_90 (launch_programmatic's check).
inline cudaError_t emu_func_attributes(cudaFuncAttributes* a, const void*) {
  *a = cudaFuncAttributes{};
  a->ptxVersion = 90;
  a->binaryVersion = 90;
  return cudaSuccess;
}
#define cudaFuncGetAttributes emu_func_attributes
#define cudaGetErrorString(e) "emu"
#define cudaMallocAsync(p, n, s) (throw std::runtime_error("emu: cudaMallocAsync"), cudaSuccess)
#define cudaFreeAsync(p, s) cudaSuccess
