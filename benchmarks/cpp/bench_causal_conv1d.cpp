// Standalone microbenchmark of the causal conv1d kernels (prefill and decode update): checks the
// output and final states against a plain C++ reference, then prints the median time and GB/s.
//   bench_causal_conv1d [--mode prefill|update] [--batch B] [--seqlen L] [--dim D] [--width W]
//                       [--dtype f32|f16|bf16] [--iterations N] [--warmup N] [--no-check]
#include "bench_common.h"
#include "reference.h"
#include "ssm_kernels.h"

int main(int argc, char** argv) {
  bench::Args args(argc, argv);
  const std::string mode = args.get("--mode", "prefill");
  const bool update = mode == "update";
  const int64_t batch = args.get_int("--batch", update ? 64 : 1);
  const int64_t seqlen = args.get_int("--seqlen", update ? 1 : 4096);
  const int64_t dim = args.get_int("--dim", 5120);
  const int width = static_cast<int>(args.get_int("--width", 4));
  const tpssm::DType dtype = bench::parse_dtype(args.get("--dtype", "bf16"));
  const int iterations = static_cast<int>(args.get_int("--iterations", 100));
  const int warmup = static_cast<int>(args.get_int("--warmup", 10));
  const bool silu = true;
  std::printf("causal_conv1d %s: batch %lld seqlen %lld dim %lld width %d dtype %s\n",
              mode.c_str(), (long long)batch, (long long)seqlen, (long long)dim, width,
              tpssm::dtype_name(dtype));

  const size_t n_x = batch * seqlen * dim;
  const size_t n_state = batch * dim * (width - 1);
  auto x = bench::random_vector(n_x, -1.f, 1.f, 1, dtype);
  auto weight = bench::random_vector(dim * width, -0.5f, 0.5f, 2, dtype);
  auto bias = bench::random_vector(dim, -0.5f, 0.5f, 3, dtype);
  auto state0 = bench::random_vector(n_state, -1.f, 1.f, 4, dtype);
  std::vector<float> out_init(n_x, 1e4f);  // poison: every output must be written

  bench::DeviceBuffer d_x, d_w, d_b, d_state, d_state0, d_out;
  d_x.upload(dtype, x);
  d_w.upload(dtype, weight);
  d_b.upload(dtype, bias);
  d_state.upload(dtype, state0);
  d_state0.upload(dtype, state0);
  d_out.upload(dtype, out_init);

  std::vector<uint8_t> has_init(batch, 1);
  bool* d_has_init = nullptr;
  BENCH_CHECK(cudaMalloc(&d_has_init, batch));
  BENCH_CHECK(cudaMemcpy(d_has_init, has_init.data(), batch, cudaMemcpyHostToDevice));

  std::function<void()> run;
  if (update) {
    tpssm::CausalConv1dUpdateParams p{};
    p.dtype = dtype;
    p.batch = batch;
    p.dim = dim;
    p.seqlen = seqlen;
    p.width = width;
    p.silu = silu;
    p.x = d_x.ptr;
    p.x_batch_stride = seqlen * dim;
    p.x_token_stride = dim;
    p.weight = d_w.ptr;
    p.weight_channel_stride = width;
    p.weight_width_stride = 1;
    p.bias = d_b.ptr;
    p.out = d_out.ptr;
    p.out_batch_stride = seqlen * dim;
    p.out_token_stride = dim;
    p.conv_state = d_state.ptr;
    p.num_slots = batch;
    p.conv_state_slot_stride = dim * (width - 1);
    p.conv_state_channel_stride = width - 1;
    p.conv_state_width_stride = 1;
    p.cache_indices = nullptr;
    p.pad_slot_id = -1;
    run = [p] { tpssm::run_causal_conv1d_update(p, nullptr); };
  } else {
    tpssm::CausalConv1dParams p{};
    p.dtype = dtype;
    p.batch = batch;
    p.dim = dim;
    p.seqlen = seqlen;
    p.width = width;
    p.silu = silu;
    p.x = d_x.ptr;
    p.x_batch_stride = seqlen * dim;
    p.x_token_stride = dim;
    p.weight = d_w.ptr;
    p.weight_channel_stride = width;
    p.weight_width_stride = 1;
    p.bias = d_b.ptr;
    p.out = d_out.ptr;
    p.out_batch_stride = seqlen * dim;
    p.out_token_stride = dim;
    p.conv_states = d_state.ptr;
    p.num_slots = batch;
    p.conv_states_slot_stride = dim * (width - 1);
    p.conv_states_channel_stride = width - 1;
    p.conv_states_width_stride = 1;
    p.query_start_loc = nullptr;
    p.cache_indices = nullptr;
    p.has_initial_state = d_has_init;
    p.pad_slot_id = -1;
    run = [p] { tpssm::run_causal_conv1d(p, nullptr); };
  }
  auto reset = [&] {
    BENCH_CHECK(cudaMemcpyAsync(d_state.ptr, d_state0.ptr, d_state.bytes,
                                cudaMemcpyDeviceToDevice));
  };

  bool ok = true;
  if (!args.has("--no-check")) {
    reset();
    run();
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref_out(n_x), ref_state = state0;
    bench::conv_ref(x, weight, bias, ref_state, ref_out, batch, seqlen, dim, width, silu);
    ok &= bench::report_check("out", bench::compare(d_out.download(n_x), ref_out, {}), dtype);
    // The stored state is a copy of inputs: exact up to the storage rounding.
    ok &= bench::report_check("final state",
                              bench::compare(d_state.download(n_state), ref_state, {}), dtype);
  }

  const float ms = bench::median_ms(run, reset, warmup, iterations);
  const double elem = static_cast<double>(bench::dtype_size(dtype));
  // x read + out written + state read and written + weights and bias.
  const double bytes = elem * (2.0 * n_x + 2.0 * n_state + dim * (width + 1));
  bench::print_timing(update ? "causal_conv1d_update" : "causal_conv1d", ms, bytes);
  BENCH_CHECK(cudaFree(d_has_init));
  return ok ? 0 : 1;
}
