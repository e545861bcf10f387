// Standalone microbenchmark of the prefill selective scan (dense batch, initial states from the
// slots, delta softplus, D and z): checks a strided subset of channels (all tokens, all states)
// against a plain C++ reference, then prints the median time and GB/s.
//   bench_selective_scan [--form mamba1|mamba2] [--batch B] [--seqlen L] [--nheads H]
//       [--headdim P] [--dstate N] [--ngroups G] [--dtype f32|f16|bf16] [--state-dtype f32|act]
//       [--algorithm auto|recurrent|recurrent_direct|ssd] [--split-len N] [--lanes 0|1|2|4|8]
//       [--check-channels K] [--iterations N] [--warmup N] [--no-check]
#include <limits>

#include "bench_common.h"
#include "reference.h"
#include "ssm_kernels.h"

namespace {

tpssm::ScanAlgorithm parse_algorithm(const std::string& name) {
  if (name == "auto") return tpssm::ScanAlgorithm::kAuto;
  if (name == "recurrent") return tpssm::ScanAlgorithm::kRecurrent;
  if (name == "recurrent_direct") return tpssm::ScanAlgorithm::kRecurrentDirect;
  if (name == "ssd") return tpssm::ScanAlgorithm::kSsd;
  std::fprintf(stderr, "--algorithm must be auto, recurrent, recurrent_direct or ssd\n");
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv);
  const bool mamba1 = args.get("--form", "mamba1") == "mamba1";
  bench::ScanShape s{};
  s.batch = args.get_int("--batch", 1);
  s.seqlen = args.get_int("--seqlen", 4096);
  s.nheads = args.get_int("--nheads", mamba1 ? 1280 : 20);
  s.headdim = mamba1 ? 1 : args.get_int("--headdim", 64);
  s.dstate = args.get_int("--dstate", mamba1 ? 16 : 128);
  s.ngroups = args.get_int("--ngroups", 1);
  s.per_state_a = mamba1;
  const tpssm::DType dtype = bench::parse_dtype(args.get("--dtype", "bf16"));
  const tpssm::DType state_dtype =
      args.get("--state-dtype", "f32") == "act" ? dtype : tpssm::DType::kFloat32;
  const int iterations = static_cast<int>(args.get_int("--iterations", 20));
  const int warmup = static_cast<int>(args.get_int("--warmup", 3));
  const int64_t check_channels = args.get_int("--check-channels", 48);
  std::printf("selective_scan %s: batch %lld seqlen %lld nheads %lld headdim %lld dstate %lld "
              "ngroups %lld dtype %s state %s\n",
              mamba1 ? "mamba1" : "mamba2", (long long)s.batch, (long long)s.seqlen,
              (long long)s.nheads, (long long)s.headdim, (long long)s.dstate,
              (long long)s.ngroups, tpssm::dtype_name(dtype), tpssm::dtype_name(state_dtype));

  const int64_t dim = s.nheads * s.headdim;
  const int64_t tokens = s.batch * s.seqlen;
  const size_t n_act = tokens * dim;
  const size_t n_bc = tokens * s.ngroups * s.dstate;
  const size_t n_state = s.batch * dim * s.dstate;
  auto u = bench::random_vector(n_act, -1.f, 1.f, 1, dtype);
  auto z = bench::random_vector(n_act, -1.f, 1.f, 2, dtype);
  auto delta = bench::random_vector(tokens * s.nheads, -4.f, -1.f, 3, dtype);
  auto A = bench::random_vector(s.nheads * (mamba1 ? s.dstate : 1), -4.f, -0.5f, 4,
                                tpssm::DType::kFloat32);
  auto B = bench::random_vector(n_bc, -1.f, 1.f, 5, dtype);
  auto C = bench::random_vector(n_bc, -1.f, 1.f, 6, dtype);
  auto D = bench::random_vector(s.nheads, -1.f, 1.f, 7, tpssm::DType::kFloat32);
  auto delta_bias = bench::random_vector(s.nheads, -1.f, 0.f, 8, tpssm::DType::kFloat32);
  auto state0 = bench::random_vector(n_state, -1.f, 1.f, 9, state_dtype);

  bench::DeviceBuffer d_u, d_z, d_delta, d_A, d_B, d_C, d_D, d_bias, d_state, d_state0, d_out;
  d_u.upload(dtype, u);
  d_z.upload(dtype, z);
  d_delta.upload(dtype, delta);
  d_A.upload(tpssm::DType::kFloat32, A);
  d_B.upload(dtype, B);
  d_C.upload(dtype, C);
  d_D.upload(tpssm::DType::kFloat32, D);
  d_bias.upload(tpssm::DType::kFloat32, delta_bias);
  d_state.upload(state_dtype, state0);
  d_state0.upload(state_dtype, state0);
  d_out.upload(dtype, std::vector<float>(n_act, 1e4f));
  std::vector<uint8_t> has_init(s.batch, 1);
  bool* d_has_init = nullptr;
  BENCH_CHECK(cudaMalloc(&d_has_init, s.batch));
  BENCH_CHECK(cudaMemcpy(d_has_init, has_init.data(), s.batch, cudaMemcpyHostToDevice));

  tpssm::SelectiveScanParams p{};
  p.act_dtype = dtype;
  p.state_dtype = state_dtype;
  p.batch = s.batch;
  p.seqlen = s.seqlen;
  p.nheads = s.nheads;
  p.headdim = s.headdim;
  p.dstate = s.dstate;
  p.ngroups = s.ngroups;
  p.a_is_per_state = mamba1;
  p.delta_softplus = true;
  p.u = d_u.ptr;
  p.u_batch_stride = s.seqlen * dim;
  p.u_token_stride = dim;
  p.delta = d_delta.ptr;
  p.delta_batch_stride = s.seqlen * s.nheads;
  p.delta_token_stride = s.nheads;
  p.A = static_cast<const float*>(d_A.ptr);
  p.A_head_stride = mamba1 ? s.dstate : 1;
  p.A_state_stride = mamba1 ? 1 : 0;
  p.B = d_B.ptr;
  p.B_batch_stride = s.seqlen * s.ngroups * s.dstate;
  p.B_token_stride = s.ngroups * s.dstate;
  p.B_group_stride = s.dstate;
  p.C = d_C.ptr;
  p.C_batch_stride = p.B_batch_stride;
  p.C_token_stride = p.B_token_stride;
  p.C_group_stride = s.dstate;
  p.D = static_cast<const float*>(d_D.ptr);
  p.z = d_z.ptr;
  p.z_batch_stride = s.seqlen * dim;
  p.z_token_stride = dim;
  p.delta_bias = static_cast<const float*>(d_bias.ptr);
  p.out = d_out.ptr;
  p.out_batch_stride = s.seqlen * dim;
  p.out_token_stride = dim;
  p.ssm_states = d_state.ptr;
  p.num_slots = s.batch;
  p.ssm_states_slot_stride = dim * s.dstate;
  p.ssm_states_head_stride = s.headdim * s.dstate;
  p.ssm_states_dim_stride = s.dstate;
  p.query_start_loc = nullptr;
  p.cache_indices = nullptr;
  p.has_initial_state = d_has_init;
  p.pad_slot_id = -1;
  p.dt_min = -std::numeric_limits<float>::infinity();
  p.dt_max = std::numeric_limits<float>::infinity();
  p.algorithm = parse_algorithm(args.get("--algorithm", "auto"));
  p.split_len = args.get_int("--split-len", 0);
  p.lanes_per_channel = args.get_int("--lanes", 0);

  const tpssm::ScanPlan plan = tpssm::plan_selective_scan(p);
  const size_t ws_bytes = static_cast<size_t>(plan.workspace_bytes);
  void* workspace = nullptr;
  if (ws_bytes) BENCH_CHECK(cudaMalloc(&workspace, ws_bytes));
  std::printf("plan: %s, %d thread(s) a channel, workspace %.1f MB\n",
              ws_bytes ? "chunked" : "one block row per sequence", plan.group_threads,
              ws_bytes / 1e6);
  auto run = [&] { tpssm::run_selective_scan(p, plan, workspace, ws_bytes, nullptr); };
  auto reset = [&] {
    BENCH_CHECK(cudaMemcpyAsync(d_state.ptr, d_state0.ptr, d_state.bytes,
                                cudaMemcpyDeviceToDevice));
  };

  bool ok = true;
  if (!args.has("--no-check")) {
    reset();
    run();
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref_out(n_act, 0.f), ref_state = state0;
    std::vector<char> use_out(n_act, 0), use_state(n_state, 0);
    const int64_t step = std::max<int64_t>(1, dim / std::max<int64_t>(1, check_channels));
    for (int64_t c = 0; c < dim; c += step) {
      bench::scan_ref_channel(s, c, u, delta, A, B, C, D, z, delta_bias, ref_state, ref_out);
      for (int64_t t = 0; t < tokens; ++t) use_out[t * dim + c] = 1;
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t n = 0; n < s.dstate; ++n) use_state[(b * dim + c) * s.dstate + n] = 1;
      }
    }
    ok &= bench::report_check("out", bench::compare(d_out.download(n_act), ref_out, use_out),
                              dtype);
    // The SSD form (Mamba2, 16-bit activations) rounds its tensor-core operands to the
    // activation dtype, so its fp32 state carries that dtype's rounding.
    const bool ssd_rounding = !mamba1 && dtype != tpssm::DType::kFloat32 &&
                              p.algorithm != tpssm::ScanAlgorithm::kRecurrent &&
                              p.algorithm != tpssm::ScanAlgorithm::kRecurrentDirect;
    ok &= bench::report_check(
        "final state", bench::compare(d_state.download(n_state), ref_state, use_state),
        ssd_rounding ? dtype : state_dtype);
  }

  const float ms = bench::median_ms(run, reset, warmup, iterations);
  const double act = static_cast<double>(bench::dtype_size(dtype));
  // u, z, out, delta, B, C once each; the state read and written once.
  const double bytes = act * (3.0 * n_act + tokens * s.nheads + 2.0 * n_bc) +
                       2.0 * n_state * bench::dtype_size(state_dtype);
  bench::print_timing("selective_scan", ms, bytes);
  if (workspace) BENCH_CHECK(cudaFree(workspace));
  BENCH_CHECK(cudaFree(d_has_init));
  return ok ? 0 : 1;
}
