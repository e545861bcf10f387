// Standalone microbenchmark of the decode state update: checks against a plain C++ reference,
// then prints the median time and GB/s (state read + write dominate).
//   bench_selective_state_update [--form mamba1|mamba2] [--batch B] [--nheads H] [--headdim P]
//       [--dstate N] [--ngroups G] [--dtype f32|f16|bf16] [--state-dtype f32|act]
//       [--iterations N] [--warmup N] [--no-check]
#include "bench_common.h"
#include "reference.h"
#include "ssm_kernels.h"

int main(int argc, char** argv) {
  bench::Args args(argc, argv);
  const bool mamba1 = args.get("--form", "mamba2") == "mamba1";
  bench::ScanShape s{};
  s.batch = args.get_int("--batch", 64);
  s.seqlen = 1;
  s.nheads = args.get_int("--nheads", mamba1 ? 5120 : 80);
  s.headdim = mamba1 ? 1 : args.get_int("--headdim", 64);
  s.dstate = args.get_int("--dstate", mamba1 ? 16 : 128);
  s.ngroups = args.get_int("--ngroups", 1);
  s.per_state_a = mamba1;
  const tpssm::DType dtype = bench::parse_dtype(args.get("--dtype", "bf16"));
  const tpssm::DType state_dtype =
      args.get("--state-dtype", "f32") == "act" ? dtype : tpssm::DType::kFloat32;
  const int iterations = static_cast<int>(args.get_int("--iterations", 100));
  const int warmup = static_cast<int>(args.get_int("--warmup", 10));
  std::printf("selective_state_update %s: batch %lld nheads %lld headdim %lld dstate %lld "
              "ngroups %lld dtype %s state %s\n",
              mamba1 ? "mamba1" : "mamba2", (long long)s.batch, (long long)s.nheads,
              (long long)s.headdim, (long long)s.dstate, (long long)s.ngroups,
              tpssm::dtype_name(dtype), tpssm::dtype_name(state_dtype));

  const int64_t dim = s.nheads * s.headdim;
  const size_t n_state = s.batch * dim * s.dstate;
  const size_t n_bc = s.batch * s.ngroups * s.dstate;
  auto x = bench::random_vector(s.batch * dim, -1.f, 1.f, 1, dtype);
  auto z = bench::random_vector(s.batch * dim, -1.f, 1.f, 2, dtype);
  auto dt = bench::random_vector(s.batch * s.nheads, -3.f, 0.f, 3, dtype);
  auto A = bench::random_vector(s.nheads * (mamba1 ? s.dstate : 1), -4.f, -0.5f, 4,
                                tpssm::DType::kFloat32);
  auto B = bench::random_vector(n_bc, -1.f, 1.f, 5, dtype);
  auto C = bench::random_vector(n_bc, -1.f, 1.f, 6, dtype);
  auto D = bench::random_vector(s.nheads, -1.f, 1.f, 7, tpssm::DType::kFloat32);
  auto dt_bias = bench::random_vector(s.nheads, -1.f, 0.f, 8, tpssm::DType::kFloat32);
  auto state0 = bench::random_vector(n_state, -1.f, 1.f, 9, state_dtype);

  bench::DeviceBuffer d_x, d_z, d_dt, d_A, d_B, d_C, d_D, d_bias, d_state, d_state0, d_out;
  d_x.upload(dtype, x);
  d_z.upload(dtype, z);
  d_dt.upload(dtype, dt);
  d_A.upload(tpssm::DType::kFloat32, A);
  d_B.upload(dtype, B);
  d_C.upload(dtype, C);
  d_D.upload(tpssm::DType::kFloat32, D);
  d_bias.upload(tpssm::DType::kFloat32, dt_bias);
  d_state.upload(state_dtype, state0);
  d_state0.upload(state_dtype, state0);
  d_out.upload(dtype, std::vector<float>(s.batch * dim, 1e4f));

  tpssm::SelectiveStateUpdateParams p{};
  p.act_dtype = dtype;
  p.state_dtype = state_dtype;
  p.batch = s.batch;
  p.nheads = s.nheads;
  p.headdim = s.headdim;
  p.dstate = s.dstate;
  p.ngroups = s.ngroups;
  p.a_is_per_state = mamba1;
  p.dt_softplus = true;
  p.state = d_state.ptr;
  p.num_slots = s.batch;
  p.state_slot_stride = dim * s.dstate;
  p.state_head_stride = s.headdim * s.dstate;
  p.state_dim_stride = s.dstate;
  p.x = d_x.ptr;
  p.x_batch_stride = dim;
  p.dt = d_dt.ptr;
  p.dt_batch_stride = s.nheads;
  p.A = static_cast<const float*>(d_A.ptr);
  p.A_head_stride = mamba1 ? s.dstate : 1;
  p.A_state_stride = mamba1 ? 1 : 0;
  p.B = d_B.ptr;
  p.B_batch_stride = s.ngroups * s.dstate;
  p.B_group_stride = s.dstate;
  p.C = d_C.ptr;
  p.C_batch_stride = s.ngroups * s.dstate;
  p.C_group_stride = s.dstate;
  p.D = static_cast<const float*>(d_D.ptr);
  p.z = d_z.ptr;
  p.z_batch_stride = dim;
  p.dt_bias = static_cast<const float*>(d_bias.ptr);
  p.out = d_out.ptr;
  p.out_batch_stride = dim;
  p.state_batch_indices = nullptr;
  p.dst_state_batch_indices = nullptr;
  p.pad_slot_id = -1;
  auto run = [&] { tpssm::run_selective_state_update(p, nullptr); };
  // The update decays the state towards bounded values, so timed runs need no reset (a reset
  // copy would also leave the state warm in L2).
  auto no_reset = [] {};

  bool ok = true;
  if (!args.has("--no-check")) {
    run();
    BENCH_CHECK(cudaDeviceSynchronize());
    std::vector<float> ref_out(s.batch * dim), ref_state = state0;
    bench::state_update_ref(s, x, dt, A, B, C, D, z, dt_bias, ref_state, ref_out);
    ok &= bench::report_check("out", bench::compare(d_out.download(ref_out.size()), ref_out, {}),
                              dtype);
    ok &= bench::report_check("state", bench::compare(d_state.download(n_state), ref_state, {}),
                              state_dtype);
  }
  const float ms = bench::median_ms(run, no_reset, warmup, iterations);
  const double act = static_cast<double>(bench::dtype_size(dtype));
  const double bytes = 2.0 * n_state * bench::dtype_size(state_dtype) +
                       act * (3.0 * s.batch * dim + s.batch * s.nheads + 2.0 * n_bc);
  bench::print_timing("selective_state_update", ms, bytes);
  return ok ? 0 : 1;
}
