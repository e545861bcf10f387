// Self-test of emu_shim.h / emu_mma.h, without torch: kernels that must run and kernels whose
// fault the emulator must report. Prints one line per case, "<case> ok" or "<case> error: <what>"
// (tests/test_cuda_emu_shim.py builds and runs it, and holds the expected lines).
#include <cfenv>
#include <cstdio>
#include <thread>
#include <vector>

#include "emu_shim.h"
#include "emu_mma.h"

// Each thread reads another's shared entry across a barrier reused 100 times, then warp-sums.
__global__ void barrier_and_warp_sum(float* out) {
  __shared__ float s[256];
  float v = 0.0f;
  for (int round = 0; round < 100; ++round) {
    s[threadIdx.x] = static_cast<float>(threadIdx.x + round);
    __syncthreads();
    v += s[blockDim.x - 1 - threadIdx.x];
    __syncthreads();
  }
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Lanes 0-15 rotate their values by one among themselves; lanes 16-31 do not take part.
__global__ void half_warp_shuffle(float* out) {
  float v = static_cast<float>(threadIdx.x);
  const int lane = threadIdx.x & 31;
  if (lane < 16) v = __shfl_sync(0x0000ffffu, v, (lane + 1) % 16, 16);
  out[threadIdx.x] = v;
}

__global__ void early_exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_member_missing(float* out) {
  float v = 1.0f;
  if (threadIdx.x != 3) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void cp_async_never_waited(const float* in) {
  tpssm::cp_async_16(tpssm::smem_address(emu_dynamic_smem() + 16 * threadIdx.x), in, true);
  tpssm::cp_async_commit();
}

// A race: thread t reads thread t - 1's entry with no barrier between. Thread order decides what
// it sees (EMU_THREAD_ORDER=reverse shows the stale entry).
__global__ void read_without_barrier(float* out) {
  __shared__ float s[64];
  const float token = out[64];
  s[threadIdx.x] = token + static_cast<float>(threadIdx.x);
  if (threadIdx.x > 0) out[threadIdx.x] = s[threadIdx.x - 1];
}

// The same race right after a barrier: thread 0 writes, the second warp reads. Threads past a
// barrier go on in thread order, so the reverse order shows the stale entry here too.
__global__ void read_after_barrier_without_barrier(float* out) {
  __shared__ float s;
  const float token = out[96];
  __syncthreads();
  if (threadIdx.x == 0) s = token;
  if (threadIdx.x >= 32 && threadIdx.x < 64) out[threadIdx.x] = s;
}

// A race between the blocks of one launch: block b (linear in x, y, z) reads block b - 1's
// entry. Blocks run one after another, last to first under EMU_THREAD_ORDER=reverse, which
// shows the stale entry.
__global__ void read_other_block(float* out) {
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const float token = out[128];
  if (threadIdx.x != 0) return;
  out[256 + b] = token + static_cast<float>(b);
  if (b > 0) out[512 + b] = out[256 + b - 1];
}

// Rounding mode set by one thread: the other threads and the host keep their own (each context
// carries the MXCSR and x87 control words).
__global__ void rounding_mode_per_thread(float* out) {
  if (threadIdx.x == 0) fesetround(FE_UPWARD);
  __syncthreads();
  out[threadIdx.x] = fegetround() == FE_UPWARD ? 1.0f : 0.0f;
}

__global__ void nothing(float*) {}

template <typename Kernel, typename Arg>
static void run(const char* name, Kernel* k, dim3 grid, dim3 block, size_t smem, Arg arg) {
  emu_error.clear();
  try {
    emu_launch(k, grid, block, smem, nullptr, arg);
    std::printf("%s ok\n", name);
  } catch (const std::exception& e) {
    std::printf("%s error: %s\n", name, e.what());
  }
}

// Launches from two host threads at once (each 20 times, into its own buffer): one waits for
// the other's to end, so both compute what a launch alone does. Run concurrently, they would
// share the running block, the fibers and barrier_and_warp_sum's __shared__ array.
static bool two_host_threads_launch() {
  std::vector<float> alone(2 * 128), a(2 * 128), b(2 * 128);
  emu_launch(&barrier_and_warp_sum, dim3(2), dim3(128), 0, nullptr, alone.data());
  const auto launches = [](float* out) {
    for (int i = 0; i < 20; ++i) {
      emu_launch(&barrier_and_warp_sum, dim3(2), dim3(128), 0, nullptr, out);
    }
  };
  std::thread first(launches, a.data()), second(launches, b.data());
  first.join();
  second.join();
  return a == alone && b == alone;
}

int main() {
  std::vector<float> out(4 * 256, -1.0f);
  run("barrier_and_warp_sum", &barrier_and_warp_sum, dim3(4), dim3(256), 0, out.data());
  // Thread t of a block reads 255 - t + round; its warp w sums 32 such values over 100 rounds.
  bool right = true;
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t < 256; ++t) {
      const int w = t / 32;
      double want = 0;
      for (int lane = 0; lane < 32; ++lane) want += 100.0 * (255 - (32 * w + lane)) + 4950.0;
      right = right && out[b * 256 + t] == static_cast<float>(want);
    }
  std::printf("barrier_and_warp_sum values %s\n", right ? "right" : "wrong");
  run("half_warp_shuffle", &half_warp_shuffle, dim3(1), dim3(64), 0, out.data());
  // Lane l < 16 of warp w reads lane (l + 1) % 16: 32 w + (l + 1) % 16.
  std::printf("half_warp_shuffle values %s\n",
              out[0] == 1.0f && out[14] == 15.0f && out[15] == 0.0f && out[20] == 20.0f &&
                      out[32] == 33.0f && out[47] == 32.0f && out[63] == 63.0f
                  ? "right"
                  : "wrong");
  run("early_exit_before_barrier", &early_exit_before_barrier, dim3(2), dim3(64), 0, out.data());
  run("shuffle_member_missing", &shuffle_member_missing, dim3(1), dim3(64), 0, out.data());
  run("cp_async_never_waited", &cp_async_never_waited, dim3(1), dim3(32), 32 * 16,
      static_cast<const float*>(out.data()));
  for (int launch = 1; launch <= 2; ++launch) {
    out[64] = 1000.0f * launch;
    run("read_without_barrier", &read_without_barrier, dim3(1), dim3(64), 0, out.data());
    bool fresh = true;
    for (int t = 1; t < 64; ++t) fresh = fresh && out[t] == out[64] + static_cast<float>(t - 1);
    std::printf("read_without_barrier sees %s entries\n", fresh ? "fresh" : "stale");
  }
  for (int launch = 1; launch <= 2; ++launch) {
    out[96] = 1000.0f * launch;
    run("read_after_barrier_without_barrier", &read_after_barrier_without_barrier, dim3(1),
        dim3(96), 0, out.data());
    bool fresh = true;
    for (int t = 32; t < 64; ++t) fresh = fresh && out[t] == out[96];
    std::printf("read_after_barrier_without_barrier sees %s entries\n", fresh ? "fresh" : "stale");
  }
  for (int launch = 1; launch <= 2; ++launch) {
    out[128] = 1000.0f * launch;
    run("read_other_block", &read_other_block, dim3(4, 2, 2), dim3(32), 0, out.data());
    bool every_block = true, fresh = true;
    for (int b = 0; b < 16; ++b) every_block = every_block && out[256 + b] == out[128] + b;
    for (int b = 1; b < 16; ++b) fresh = fresh && out[512 + b] == out[128] + (b - 1);
    std::printf("read_other_block: every block %s, sees %s entries\n",
                every_block ? "ran" : "missing", fresh ? "fresh" : "stale");
  }
  run("rounding_mode_per_thread", &rounding_mode_per_thread, dim3(1), dim3(64), 0, out.data());
  std::printf("rounding_mode_per_thread: thread 0 %s, thread 1 %s, host %s\n",
              out[0] == 1.0f ? "upward" : "nearest", out[1] == 1.0f ? "upward" : "nearest",
              fegetround() == FE_UPWARD ? "upward" : "nearest");
  run("block_of_1025_threads", &nothing, dim3(1), dim3(1025), 0, out.data());
  // A launch after a fault runs normally (nothing is left over in the barriers or the fibers).
  run("barrier_after_faults", &barrier_and_warp_sum, dim3(2), dim3(128), 0, out.data());
  std::printf("two_host_threads_launch values %s\n", two_host_threads_launch() ? "right" : "wrong");
  return 0;
}
