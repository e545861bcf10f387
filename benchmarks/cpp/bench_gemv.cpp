// Standalone microbenchmark of the decode-sized projection (gemv): checks against a plain C++
// reference (double sums), then prints the median time and GB/s (the weight dominates; it is
// rotated over enough copies to miss the L2 cache).
//   bench_gemv [--m M] [--n N] [--k K] [--dtype f32|f16|bf16] [--bias]
//       [--warps-per-row W] [--rows-per-warp R] [--iterations N] [--warmup N] [--no-check]
#include "bench_common.h"
#include "gemv_kernels.h"

int main(int argc, char** argv) {
  bench::Args args(argc, argv);
  const int64_t M = args.get_int("--m", 1), N = args.get_int("--n", 10240),
                K = args.get_int("--k", 2560);
  const tpssm::DType dtype = bench::parse_dtype(args.get("--dtype", "bf16"));
  const bool with_bias = args.has("--bias");
  const int iterations = static_cast<int>(args.get_int("--iterations", 100));
  const int warmup = static_cast<int>(args.get_int("--warmup", 10));
  if (M < 1 || M > tpssm::kGemvMaxRows || N < 1 || K < 1) {
    std::fprintf(stderr, "bench_gemv: need 1 <= m <= %lld, n >= 1, k >= 1\n",
                 (long long)tpssm::kGemvMaxRows);
    return 2;
  }
  std::printf("gemv: m %lld n %lld k %lld dtype %s%s\n", (long long)M, (long long)N,
              (long long)K, tpssm::dtype_name(dtype), with_bias ? " bias" : "");

  const double weight_bytes = static_cast<double>(N) * K * bench::dtype_size(dtype);
  int l2 = 0;
  BENCH_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
  // Three L2s of weight copies, each read once per rotation: from DRAM, as in a decode step
  // (a 64-copy cap left 0.4 MB weights in a 50 MB L2).
  const int copies = static_cast<int>(
      std::min(1024.0, std::max(1.0, std::ceil(3.0 * l2 / weight_bytes))));
  auto x = bench::random_vector(M * K, -1.f, 1.f, 1, dtype);
  auto w = bench::random_vector(N * K, -1.f / std::sqrt(float(K)), 1.f / std::sqrt(float(K)),
                                2, dtype);
  auto b = bench::random_vector(N, -1.f, 1.f, 3, dtype);
  bench::DeviceBuffer d_x, d_b, d_out;
  std::vector<bench::DeviceBuffer> d_w(copies);
  d_x.upload(dtype, x);
  d_b.upload(dtype, b);
  for (auto& d : d_w) d.upload(dtype, w);
  d_out.upload(dtype, std::vector<float>(M * N, 1e4f));

  tpssm::GemvParams p{};
  p.rows = M;
  p.out_features = N;
  p.in_features = K;
  p.x_row_stride = K;
  p.weight_row_stride = K;
  p.out_row_stride = N;
  p.dtype = dtype;
  p.x = d_x.ptr;
  p.weight = d_w[0].ptr;
  p.bias = with_bias ? d_b.ptr : nullptr;
  p.out = d_out.ptr;
  p.warps_per_row = static_cast<int>(args.get_int("--warps-per-row", 0));
  p.rows_per_warp = static_cast<int>(args.get_int("--rows-per-warp", 0));
  int sms = 0;
  BENCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const tpssm::GemvPlan plan = tpssm::plan_gemv(p, sms);
  std::printf("plan: warps_per_row %d rows_per_warp %d %s, %lld blocks; %d weight copies\n",
              plan.warps_per_row, plan.rows_per_warp, plan.vectorized ? "16-byte" : "element",
              (long long)plan.blocks, copies);

  bool ok = true;
  if (!args.has("--no-check")) {
    tpssm::run_gemv(p, nullptr);
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref(M * N);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        double s = with_bias ? b[n] : 0.0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[m * K + k]) * w[n * K + k];
        ref[m * N + n] = static_cast<float>(s);
      }
    }
    ok &= bench::report_check("out", bench::compare(d_out.download(ref.size()), ref, {}),
                              dtype);
  }
  int next = 0;
  auto run = [&] {
    p.weight = d_w[next].ptr;
    next = (next + 1) % copies;
    tpssm::run_gemv(p, nullptr);
  };
  const float ms = bench::median_ms(run, [] {}, warmup, iterations);
  const double bytes =
      weight_bytes + static_cast<double>(bench::dtype_size(dtype)) * (M * K + M * N);
  bench::print_timing("gemv", ms, bytes);
  return ok ? 0 : 1;
}
