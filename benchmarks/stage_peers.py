"""Stages the peer kernels that bench_peers.py times beside tpssm's into .peer/ at the repository
root. .peer/ is git-ignored and never committed: peer code is for timing on the lent GPU machine
only (name ".peer" in the device call's `carry`).

What is staged, from the projects' source distributions on PyPI (the sha256 PyPI lists checked;
none of their build scripts or Python is run here), each with its license:
- mamba_ssm: its Triton kernels (the chunked SSD scan of Mamba-2 prefill, the selective state
  update, the fused residual-add RMSNorm and the gated RMSNorm). Its package __init__ files are
  replaced by empty ones, so the kernels import without its CUDA extension or causal_conv1d.
  Its Mamba-1 prefill scan (CUDA C++).
- vLLM: its Mamba-2 prefill scan (the varlen SSD kernels, states read from and written to cache
  slots), its conv prefill and its decode kernels (the selective state update, with its tuned
  launch configurations for NVIDIA GPUs, and the conv update). The few vLLM modules those files
  import (platform, logging, settings, constants) are replaced by small stand-ins written here,
  in .peer/vllm/ beside the staged files. Its Mamba-1 prefill scan (CUDA C++).
- causal-conv1d: its prefill and decode conv kernels (CUDA C++).
The CUDA C++ kernels are built here by nvcc, without their libtorch bindings, each with a shim
of ours in the binding's place, into torch-free sm_90 libraries in .peer/lib/ (build_library)
that bench_peers.py calls through ctypes.
Needs the network (PyPI) and nvcc (CUDA_HOME); run here, not on the GPU machine.
Usage: stage_peers.py"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / ".peer"
MAMBA_SSM = "2.3.2.post1"
VLLM = "0.34.0"
CAUSAL_CONV1D = "1.7.0"
# The modules mamba_ssm's forward kernels import, inside its mamba_ssm/ folder.
MAMBA_SSM_MODULES = [f"ops/triton/{m}.py" for m in (
    "softplus", "ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan",
    "ssd_combined", "layernorm_gated", "layer_norm", "k_activations", "selective_state_update")
] + ["utils/determinism.py", "utils/torch.py"]
VLLM_OPS = "vllm/model_executor/layers/mamba/ops"
# Stand-ins for what vLLM's files import beside Triton, torch and numpy (the values are
# vLLM's own: PAD_SLOT_ID, NULL_BLOCK_ID; device names as its tuned configs' file names use).
VLLM_STANDINS = {
    "vllm/envs.py": "VLLM_TUNED_CONFIG_FOLDER = None\n",
    "vllm/_custom_ops.py": "",
    "vllm/logger.py": '''import logging


class _Logger(logging.LoggerAdapter):
    def _once(self, level, msg, *args, **kwargs):
        self.log(level, msg, *args)

    def info_once(self, msg, *args, **kwargs):
        self._once(logging.INFO, msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self._once(logging.WARNING, msg, *args)

    def debug_once(self, msg, *args, **kwargs):
        self._once(logging.DEBUG, msg, *args)


def init_logger(name):
    return _Logger(logging.getLogger(name), {})
''',
    "vllm/platforms/__init__.py": '''import torch


class _CudaPlatform:
    def is_xpu(self):
        return False

    def is_cpu(self):
        return False

    def get_device_name(self, device_id=0):
        return torch.cuda.get_device_name(device_id) if torch.cuda.is_available() else "cpu"

    def is_cuda(self):
        return torch.cuda.is_available()

    def is_device_capability(self, capability, device_id=0):
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability(device_id)
        if isinstance(capability, int):
            return major * 10 + minor == capability
        return (major, minor) == tuple(capability)

    def is_arch_support_pdl(self):
        try:
            return torch.cuda.get_device_capability(torch.cuda.current_device())[0] >= 9
        except Exception:
            return False


current_platform = _CudaPlatform()
''',
    "vllm/triton_utils.py": "import triton\nimport triton.language as tl\n\nHAS_TRITON = True\n",
    "vllm/utils/platform_utils.py": '''import re

from vllm.platforms import current_platform


def get_device_name_as_file_name(device_id=0):
    return re.sub(r"[\\s/]+", "_", current_platform.get_device_name(device_id))
''',
    "vllm/v1/attention/backends/utils.py": "PAD_SLOT_ID = -1\nNULL_BLOCK_ID = 0\n",
}


def _check_macros(prefix: str, label: str) -> str:
    """A stand-in header for the CUDA error-check macros a peer's kernel code uses
    (PREFIX_CUDA_CHECK, PREFIX_CUDA_KERNEL_LAUNCH_CHECK): errors are printed, and reported by the
    shim's return value (cudaGetLastError), not thrown."""
    return f"""#pragma once
#include <cstdio>
#include <cuda_runtime.h>
#define {prefix}_CUDA_CHECK(EXPR) \\
  do {{ \\
    cudaError_t err_ = (EXPR); \\
    if (err_ != cudaSuccess) \\
      std::fprintf(stderr, "{label}: %s at %s:%d\\n", cudaGetErrorString(err_), __FILE__, \\
                   __LINE__); \\
  }} while (0)
#define {prefix}_CUDA_KERNEL_LAUNCH_CHECK() {prefix}_CUDA_CHECK(cudaPeekAtLastError())
"""


# vLLM's Mamba-1 prefill scan is CUDA C++ behind a libtorch binding. Its kernel code (everything
# before the binding, without the explicit instantiations) is staged, and built here into a
# library of its own, torch-free, that bench_peers.py calls through ctypes: the headers below
# stand in for the vLLM / torch ones the kernel code includes, and SHIM fills its parameter
# struct for the varlen call (layouts as vLLM's Mamba layer passes them), as its binding does.
SCAN_KERNELS = "selective_scan_fwd_kernels.cuh"
SCAN_LIBRARY = "lib/libvllm_selective_scan.so"
SCAN_STANDINS = {
    "torch_utils.h": "#pragma once\n",
    "dispatch_utils.h": """#pragma once
// A boolean known at run time, as a compile-time constant NAME inside the lambda.
#define VLLM_STABLE_DISPATCH_BOOL(COND, NAME, ...)     \\
  [&] {                                                \\
    if (COND) {                                        \\
      constexpr static bool NAME = true;               \\
      return __VA_ARGS__();                            \\
    } else {                                           \\
      constexpr static bool NAME = false;              \\
      return __VA_ARGS__();                            \\
    }                                                  \\
  }()
""",
    "standin_include/torch/csrc/stable/macros.h": _check_macros("STD", "vllm scan"),
}
# The fields vLLM's fork of the Mamba-1 scan kept from mamba_ssm's, filled as both bindings fill
# them for B and C that vary with the token; a template, as each library has its own
# SSMParamsBase. Both shims below start from it.
SCAN_SHARED_PARAMS = """
template <typename Params, typename Args>
static void fill_shared_scan_params(Params& p, const Args* a, long long seqlen) {
  memset(&p, 0, sizeof(p));
  p.batch = static_cast<int>(a->batch);
  p.dim = static_cast<int>(a->dim);
  p.seqlen = static_cast<int>(seqlen);
  p.dstate = static_cast<int>(a->dstate);
  p.n_groups = static_cast<int>(a->groups);
  p.dim_ngroups_ratio = p.dim / p.n_groups;
  p.delta_softplus = a->delta_softplus != 0;
  p.is_variable_B = p.is_variable_C = true;
  p.u_ptr = a->u;
  p.delta_ptr = a->delta;
  p.A_ptr = a->A;
  p.B_ptr = a->B;
  p.C_ptr = a->C;
  p.D_ptr = a->D;
  p.delta_bias_ptr = a->delta_bias;
  p.A_d_stride = a->dstate;  // A is (dim, dstate), contiguous
  p.A_dstate_stride = 1;
}
"""
SCAN_SHIM = """\
// bench_peers.py's entry to vLLM's Mamba-1 prefill scan (bf16 activations, fp32 weights and
// states), varlen form: u, delta, z (dim, tokens) and B, C (groups, dstate, tokens), each
// contiguous; ssm_states (slots, dim, dstate) contiguous. As vLLM's binding: the output goes to
// delta, the gated output to z. Returns the CUDA error of the launch (0: none).
#include <algorithm>  // what vLLM's build brings in before its headers
#include <cstddef>
#include <cstring>

#include "selective_scan_fwd_kernels.cuh"
""" + SCAN_SHARED_PARAMS + """
extern "C" {
struct PeerScanArgs {
  void *u, *delta, *A, *B, *C, *D, *delta_bias, *z, *ssm_states;
  void *query_start_loc, *cache_indices, *has_initial_state, *stream;
  long long batch, dim, tokens, dstate, groups, null_block_id;
  int delta_softplus;
};

int peer_vllm_selective_scan_bf16(const PeerScanArgs* a) {
  // vLLM's binding refuses these; its kernel would overrun shared memory past MAX_DSTATE.
  if (a->dstate < 1 || a->dstate > MAX_DSTATE || a->groups < 1 || a->dim % a->groups != 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  SSMParamsBase p;
  fill_shared_scan_params(p, a, a->tokens);
  p.null_block_id = a->null_block_id;
  p.out_ptr = a->delta;
  p.ssm_states_ptr = a->ssm_states;
  p.z_ptr = a->z;
  p.out_z_ptr = a->z;
  p.query_start_loc_ptr = a->query_start_loc;
  p.cache_indices_ptr = a->cache_indices;
  p.has_initial_state_ptr = a->has_initial_state;
  // Strides in elements: tokens are contiguous, channels / states a row of tokens apart.
  const size_t T = a->tokens;
  p.B_batch_stride = p.C_batch_stride = 1;
  p.B_dstate_stride = p.C_dstate_stride = T;
  p.B_group_stride = p.C_group_stride = a->dstate * T;
  p.u_batch_stride = p.delta_batch_stride = p.z_batch_stride = 1;
  p.out_batch_stride = p.out_z_batch_stride = 1;
  p.u_d_stride = p.delta_d_stride = p.z_d_stride = T;
  p.out_d_stride = p.out_z_d_stride = T;
  p.ssm_states_batch_stride = a->dim * a->dstate;
  p.ssm_states_dim_stride = a->dstate;
  p.ssm_states_dstate_stride = 1;
  p.cache_indices_stride = 1;
  selective_scan_fwd_cuda<torch::headeronly::BFloat16, float, float>(
      p, static_cast<cudaStream_t>(a->stream));
  return static_cast<int>(cudaGetLastError());
}

// For the caller's check of its copy of PeerScanArgs.
long long peer_scan_args_layout(int which) {
  return which == 0 ? sizeof(PeerScanArgs) : offsetof(PeerScanArgs, delta_softplus);
}
}
"""


# causal-conv1d's convs are CUDA C++ behind a libtorch binding too: its forward (prefill)
# kernels (channel-first, as mamba_ssm's Mamba calls it; channel-last, as its Mamba2 and
# transformers' Mamba fast path do) and its decode update are built the same way, with
# CONV_SHIM in the place of the binding.
CONV_KERNELS = "causal_conv1d_fwd_kernels.cuh"
CONV_UPDATE_KERNELS = "causal_conv1d_update_kernels.cuh"
CONV_LIBRARY = "lib/libcausal_conv1d.so"
CONV_STANDINS = {
    "standin_include/c10/cuda/CUDAException.h": _check_macros("C10", "causal_conv1d"),
}
CONV_SHIM = """\
// bench_peers.py's entry to causal-conv1d's forward conv, bf16 x / weight / bias / states. The
// tensors are described as its binding sees them, (batch, dim, seqlen) for x and out and
// (batch, dim, width - 1) for the states, strides in elements; a stride of 1 along dim (and not
// along seqlen) picks its channel-last kernel, which alone takes initial and final states, as
// its binding decides. It launches on this library's CUDA runtime's current device, device 0
// (its binding sets the device from x first; bench_peers refuses other devices). Returns the
// CUDA error of the launch (0: none).
#include <algorithm>  // what its build brings in before its headers
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#include "causal_conv1d_fwd_kernels.cuh"
#include "causal_conv1d_update_kernels.cuh"

struct PeerConvArgs {
  void *x, *weight, *bias, *out, *initial_states, *final_states, *stream;
  long long batch, dim, seqlen, width;
  long long x_batch_stride, x_c_stride, x_l_stride;
  long long weight_c_stride, weight_width_stride;
  long long out_batch_stride, out_c_stride, out_l_stride;
  long long states_batch_stride, states_c_stride, states_l_stride;
  int silu;
};

static bool fits_32_bits(long long batch, long long dim, long long len, long long sb,
                         long long sc, long long sl) {
  const long long last = (batch - 1) * sb + (dim - 1) * sc + (len - 1) * sl;
  return sb >= 0 && sc >= 0 && sl >= 0 && last < (1LL << 32);
}

static bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The fields both argument structs give alike, as its binding's set_conv_params_fwd sets them.
template <typename Args>
static ConvParamsBase shared_params(const Args* a) {
  ConvParamsBase p;
  memset(&p, 0, sizeof(p));
  p.batch = static_cast<int>(a->batch);
  p.dim = static_cast<int>(a->dim);
  p.seqlen = static_cast<int>(a->seqlen);
  p.width = static_cast<int>(a->width);
  p.silu_activation = a->silu != 0;
  p.x_ptr = a->x;
  p.weight_ptr = a->weight;
  p.bias_ptr = a->bias;
  p.out_ptr = a->out;
  p.x_batch_stride = a->x_batch_stride;
  p.x_c_stride = a->x_c_stride;
  p.x_l_stride = a->x_l_stride;
  p.weight_c_stride = a->weight_c_stride;
  p.weight_width_stride = a->weight_width_stride;
  p.out_batch_stride = a->out_batch_stride;
  p.out_c_stride = a->out_c_stride;
  p.out_l_stride = a->out_l_stride;
  return p;
}

extern "C" {

// What its binding refuses, what its kernels assume of the layouts, and offsets past their
// 32-bit indexing: 0 or cudaErrorInvalidValue. Host-only (bench_peers' CPU test calls it).
int peer_conv_args_check(const PeerConvArgs* a) {
  const bool channel_last = a->x_c_stride == 1 && a->x_l_stride > 1;
  const bool states = a->initial_states != nullptr || a->final_states != nullptr;
  bool ok = a->batch >= 1 && a->dim >= 1 && a->seqlen >= 1 && a->width >= 2 && a->width <= 4
      && (a->x_l_stride == 1 || a->x_c_stride == 1) && a->weight_width_stride == 1
      && fits_32_bits(a->batch, a->dim, a->seqlen, a->x_batch_stride, a->x_c_stride,
                      a->x_l_stride)
      && fits_32_bits(a->batch, a->dim, a->seqlen, a->out_batch_stride, a->out_c_stride,
                      a->out_l_stride)
      && fits_32_bits(1, a->dim, a->width, 0, a->weight_c_stride, a->weight_width_stride);
  // Its kernels move 16 bytes at a time along the contiguous axis, and write out as they read x.
  if (channel_last) {
    ok = ok && a->dim % 8 == 0 && a->x_l_stride % 8 == 0 && a->x_batch_stride % 8 == 0
        && a->out_c_stride == 1 && a->out_l_stride % 8 == 0 && a->out_batch_stride % 8 == 0
        && aligned_16(a->x) && aligned_16(a->out);
  } else {
    ok = ok && a->x_l_stride == 1 && a->out_l_stride == 1;
    if (a->seqlen % 8 == 0) {  // then its rows are moved 16 bytes at a time
      ok = ok && a->x_c_stride % 8 == 0 && a->x_batch_stride % 8 == 0
          && a->out_c_stride % 8 == 0 && a->out_batch_stride % 8 == 0 && aligned_16(a->x)
          && aligned_16(a->out);
    }
  }
  if (states) {
    ok = ok && channel_last && a->states_c_stride == 1 && a->states_l_stride % 8 == 0
        && a->states_batch_stride % 8 == 0 && aligned_16(a->initial_states)
        && aligned_16(a->final_states)
        && fits_32_bits(a->batch, a->dim, a->width - 1, a->states_batch_stride,
                        a->states_c_stride, a->states_l_stride);
  }
  return ok ? 0 : static_cast<int>(cudaErrorInvalidValue);
}

int peer_causal_conv1d_fwd_bf16(const PeerConvArgs* a) {
  if (const int refused = peer_conv_args_check(a)) {
    return refused;
  }
  ConvParamsBase p = shared_params(a);
  // One description serves both: the binding asks the same shape and layout of each.
  p.initial_states_ptr = a->initial_states;
  p.final_states_ptr = a->final_states;
  p.initial_states_batch_stride = p.final_states_batch_stride = a->states_batch_stride;
  p.initial_states_c_stride = p.final_states_c_stride = a->states_c_stride;
  p.initial_states_l_stride = p.final_states_l_stride = a->states_l_stride;
  const cudaStream_t stream = static_cast<cudaStream_t>(a->stream);
  if (a->x_c_stride == 1 && a->x_l_stride > 1) {
    causal_conv1d_channellast_fwd_cuda<c10::BFloat16, c10::BFloat16>(p, stream);
  } else {
    causal_conv1d_fwd_cuda<c10::BFloat16, c10::BFloat16>(p, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

// For the caller's check of its copy of PeerConvArgs.
long long peer_conv_args_layout(int which) {
  return which == 0 ? sizeof(PeerConvArgs) : offsetof(PeerConvArgs, silu);
}

// Its decode conv (causal_conv1d_update), which transformers' Mamba and mamba_ssm call: x and
// out (batch, dim, seqlen), the state pool (slots, dim, state_len >= width - 1) of any strides,
// rows at conv_state_indices (int32, batch; a negative slot: a padded row, out zeros) or at
// their own index (null). The state is shifted left by seqlen and x appended, in place.
struct PeerConvUpdateArgs {
  void *x, *weight, *bias, *out, *conv_state, *conv_state_indices, *stream;
  long long batch, dim, seqlen, width, state_len, slots;
  long long x_batch_stride, x_c_stride, x_l_stride, weight_c_stride, weight_width_stride;
  long long out_batch_stride, out_c_stride, out_l_stride;
  long long state_batch_stride, state_c_stride, state_l_stride;
  int silu;
};

// What its binding refuses and offsets past its kernel's 32-bit indexing: 0 or
// cudaErrorInvalidValue. Host-only. The slot values are the caller's to keep in range.
int peer_conv_update_args_check(const PeerConvUpdateArgs* a) {
  const bool ok = a->batch >= 1 && a->dim >= 1 && a->seqlen >= 1 && a->seqlen < (1LL << 30)
      && a->width >= 2 && a->width <= 4 && a->state_len >= a->width - 1
      && a->state_len < (1LL << 30) && a->slots >= 1
      && a->dim <= 65535LL * 64 && a->batch <= 2147483647LL
      && fits_32_bits(a->batch, a->dim, a->seqlen, a->x_batch_stride, a->x_c_stride,
                      a->x_l_stride)
      && fits_32_bits(a->batch, a->dim, a->seqlen, a->out_batch_stride, a->out_c_stride,
                      a->out_l_stride)
      && fits_32_bits(1, a->dim, a->width, 0, a->weight_c_stride, a->weight_width_stride)
      && fits_32_bits(a->slots, a->dim, a->state_len, a->state_batch_stride,
                      a->state_c_stride, a->state_l_stride)
      && (a->conv_state_indices != nullptr || a->slots >= a->batch);
  return ok ? 0 : static_cast<int>(cudaErrorInvalidValue);
}

int peer_causal_conv1d_update_bf16(const PeerConvUpdateArgs* a) {
  if (const int refused = peer_conv_update_args_check(a)) {
    return refused;
  }
  ConvParamsBase p = shared_params(a);
  p.conv_state_ptr = a->conv_state;
  p.conv_state_len = static_cast<int>(a->state_len);
  p.conv_state_batch_stride = a->state_batch_stride;
  p.conv_state_c_stride = a->state_c_stride;
  p.conv_state_l_stride = a->state_l_stride;
  p.conv_state_indices_ptr = static_cast<int32_t*>(a->conv_state_indices);
  p.cache_seqlens = nullptr;  // its linear (shifted) state, as the callers above use it
  causal_conv1d_update_cuda<c10::BFloat16, c10::BFloat16>(p, static_cast<cudaStream_t>(a->stream));
  return static_cast<int>(cudaGetLastError());
}

long long peer_conv_update_args_layout(int which) {
  return which == 0 ? sizeof(PeerConvUpdateArgs) : offsetof(PeerConvUpdateArgs, silu);
}
}
"""


# mamba_ssm's own Mamba-1 prefill scan (CUDA C++, the one transformers' Mamba fast path and
# mamba_ssm's Mamba call; vLLM's is a fork of it with varlen batches and state slots): its
# forward kernel header is staged whole (its instantiations live in other files) and built
# with DENSE_SCAN_SHIM the same way.
DENSE_SCAN_LIBRARY = "lib/libmamba_ssm_selective_scan.so"
DENSE_SCAN_HEADERS = ("selective_scan.h", "selective_scan_common.h", "static_switch.h",
                      "reverse_scan.cuh", "uninitialized_copy.cuh",
                      "selective_scan_fwd_kernel.cuh")
DENSE_SCAN_STANDINS = {
    "standin_include/c10/cuda/CUDAException.h": _check_macros("C10", "mamba_ssm scan"),
}
DENSE_SCAN_SHIM = """\
// bench_peers.py's entry to mamba_ssm's Mamba-1 prefill scan: bf16 u / delta / z / B / C, fp32
// A / D / delta_bias, dense batches, z required. u, delta, z, out and out_z are (batch, dim,
// seqlen), B and C (batch, groups, dstate, seqlen), A (dim, dstate), each contiguous; x (batch,
// dim, n_chunks, 2 * dstate) fp32, n_chunks = ceil(seqlen / 2048): the kernel's running states,
// the last chunk's odd entries being the final state. No initial state (the kernel takes
// none). Unlike its binding, it launches on this library's CUDA runtime's current device
// (device 0). Returns the CUDA error of the launch (0: none).
#include <algorithm>  // what its build brings in before its headers
#include <cstddef>
#include <cstring>

#include "selective_scan_fwd_kernel.cuh"
""" + SCAN_SHARED_PARAMS + """
// Tokens per chunk of the kernel's running states, as its binding sizes them.
constexpr long long kChunkTokens = 2048;

extern "C" {
struct PeerDenseScanArgs {
  void *u, *delta, *A, *B, *C, *D, *delta_bias, *z, *out, *out_z, *x, *stream;
  long long batch, dim, seqlen, dstate, groups;
  int delta_softplus;
};

int peer_mamba_ssm_selective_scan_bf16(const PeerDenseScanArgs* a) {
  // What its binding refuses (dstate above 256 would overrun its shared memory), what its
  // launch cannot take (a grid row per channel: at most 65535) and sizes past its int indexing
  // (the running-state offset is an int).
  const long long int_max = 2147483647LL;
  const long long chunks = (a->seqlen + kChunkTokens - 1) / kChunkTokens;
  if (a->batch < 1 || a->dim < 1 || a->dim > 65535 || a->seqlen < 1 || a->seqlen > int_max
      || a->dstate < 1 || a->dstate > 256 || a->groups < 1 || a->dim % a->groups != 0
      || a->batch * a->dim * chunks * a->dstate * 2 > int_max || a->z == nullptr
      || a->out_z == nullptr) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  SSMParamsBase p;
  fill_shared_scan_params(p, a, a->seqlen);
  p.n_chunks = static_cast<int>(chunks);
  p.out_ptr = a->out;
  p.x_ptr = a->x;
  p.z_ptr = a->z;
  p.out_z_ptr = a->out_z;
  // Strides in elements, of the contiguous layouts above.
  const size_t L = a->seqlen, N = a->dstate;
  p.B_batch_stride = p.C_batch_stride = a->groups * N * L;
  p.B_group_stride = p.C_group_stride = N * L;
  p.B_dstate_stride = p.C_dstate_stride = L;
  p.u_batch_stride = p.delta_batch_stride = p.z_batch_stride = a->dim * L;
  p.out_batch_stride = p.out_z_batch_stride = a->dim * L;
  p.u_d_stride = p.delta_d_stride = p.z_d_stride = p.out_d_stride = p.out_z_d_stride = L;
  selective_scan_fwd_cuda<c10::BFloat16, float>(p, static_cast<cudaStream_t>(a->stream));
  return static_cast<int>(cudaGetLastError());
}

// For the caller's check of its copy of PeerDenseScanArgs (0, 1), and of the chunk length it
// sizes the running-state buffer by (2).
long long peer_dense_scan_args_layout(int which) {
  return which == 0 ? sizeof(PeerDenseScanArgs)
      : which == 1  ? offsetof(PeerDenseScanArgs, delta_softplus)
                    : kChunkTokens;
}
}
"""


def _sdist(project: str, version: str) -> bytes:
    """The source archive, from PyPI's simple index (JSON form), checked against its sha256."""
    request = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        files = json.load(r)["files"]
    name = f"{project.replace('-', '_')}-{version}.tar.gz"
    found = [f for f in files if f["filename"] == name]
    if not found:
        sys.exit(f"stage_peers: PyPI lists no {name}")
    with urllib.request.urlopen(found[0]["url"], timeout=300) as r:
        data = r.read()
    if hashlib.sha256(data).hexdigest() != found[0]["hashes"]["sha256"]:
        sys.exit(f"stage_peers: {name}: sha256 differs from PyPI's")
    return data


def _write_files(root: Path, files: Dict[str, str]) -> None:
    """Writes each text of `files` at its path relative to `root`."""
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def _copy(tar: tarfile.TarFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(tar.extractfile(member).read())


def stage_mamba_ssm(dest: Path) -> None:
    top = f"mamba_ssm-{MAMBA_SSM}"
    csrc = dest / "mamba_ssm_csrc"
    with tarfile.open(fileobj=io.BytesIO(_sdist("mamba-ssm", MAMBA_SSM)), mode="r:gz") as tar:
        for relative in MAMBA_SSM_MODULES:
            _copy(tar, f"{top}/mamba_ssm/{relative}", dest / "mamba_ssm" / relative)
        for name in DENSE_SCAN_HEADERS:
            _copy(tar, f"{top}/csrc/selective_scan/{name}", csrc / name)
        _copy(tar, f"{top}/LICENSE", dest / "LICENSE.mamba_ssm")
    _write_files(csrc, {**DENSE_SCAN_STANDINS, "peer_dense_scan_shim.cu": DENSE_SCAN_SHIM})
    for init in ("__init__.py", "ops/__init__.py", "ops/triton/__init__.py", "utils/__init__.py"):
        (dest / "mamba_ssm" / init).write_text("")  # the package's own would import its extension


def stage_vllm(dest: Path) -> None:
    top = f"vllm-{VLLM}"
    with tarfile.open(fileobj=io.BytesIO(_sdist("vllm", VLLM)), mode="r:gz") as tar:
        for name in ("mamba_ssm.py", "triton_helpers.py", "causal_conv1d.py", "ssd_combined.py",
                     "ssd_bmm.py", "ssd_chunk_scan.py", "ssd_chunk_state.py",
                     "ssd_state_passing.py"):
            _copy(tar, f"{top}/{VLLM_OPS}/{name}", dest / VLLM_OPS / name)
        configs = f"{top}/{VLLM_OPS}/configs/selective_state_update/"
        for member in tar.getnames():
            if member.startswith(configs) and "device_name=NVIDIA" in member:
                _copy(tar, member, dest / member[len(top) + 1:])
        _copy(tar, f"{top}/LICENSE", dest / "LICENSE.vllm")
        csrc = dest / "vllm_csrc"
        _copy(tar, f"{top}/csrc/mamba/selective_scan.h", csrc / "mamba" / "selective_scan.h")
        source = tar.extractfile(f"{top}/csrc/mamba/selective_scan_fwd.cu").read().decode()
    # The kernel code ends where its explicit instantiations begin (the shim makes its own).
    kernels = source[:source.index("template void selective_scan_fwd_cuda<")]
    (csrc / "mamba" / SCAN_KERNELS).write_text(kernels)
    _write_files(csrc, {**SCAN_STANDINS, "mamba/peer_scan_shim.cu": SCAN_SHIM})
    _write_files(dest, VLLM_STANDINS)
    for folder in [dest / "vllm"] + [p for p in (dest / "vllm").rglob("*") if p.is_dir()]:
        if folder.name != "configs" and folder.parent.name != "configs":
            (folder / "__init__.py").touch()


def stage_causal_conv1d(dest: Path) -> None:
    top = f"causal_conv1d-{CAUSAL_CONV1D}"
    csrc = dest / "causal_conv1d_csrc"
    with tarfile.open(fileobj=io.BytesIO(_sdist("causal-conv1d", CAUSAL_CONV1D)),
                      mode="r:gz") as tar:
        for name in ("causal_conv1d.h", "causal_conv1d_common.h", "static_switch.h"):
            _copy(tar, f"{top}/csrc/{name}", csrc / name)
        _copy(tar, f"{top}/LICENSE", dest / "LICENSE.causal_conv1d")
        sources = {name: tar.extractfile(f"{top}/csrc/{name}.cu").read().decode()
                   for name in ("causal_conv1d_fwd", "causal_conv1d_update")}
    # As for vLLM's scan: the kernel code without its explicit instantiations.
    for (name, source), target in zip(sources.items(), (CONV_KERNELS, CONV_UPDATE_KERNELS)):
        (csrc / target).write_text(source[:source.index(f"template void {name}_cuda<")])
    _write_files(csrc, {**CONV_STANDINS, "peer_conv_shim.cu": CONV_SHIM})


# The code-generation flags each project builds these kernels with (beside -O3, C++17, sm_90):
# vLLM's CMake gives its Mamba scan torch's common nvcc flags; the setup.py files of
# causal-conv1d and mamba_ssm (one author's) add fast math and the bf16 / half operators.
VLLM_SCAN_FLAGS = ["-DNDEBUG", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                   "--expt-relaxed-constexpr"]
DAO_AILAB_FLAGS = ["-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                       "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                       "-U__CUDA_NO_BFLOAT162_OPERATORS__",
                       "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--expt-relaxed-constexpr",
                       "--expt-extended-lambda", "--use_fast_math"]


def build_library(what: str, shim: Path, includes: List[Path], library: Path,
                  flags: List[str]) -> str:
    """nvcc builds a peer's kernel code and our shim into a torch-free sm_90 library (tens of
    seconds on two cores; torch only lends its header folder, for its bf16 type) with the
    project's own code-generation `flags`; returns what happened, in a line."""
    import torch

    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if not nvcc.exists():
        return f"no {nvcc}: {what} not built (set CUDA_HOME)"
    library.parent.mkdir(parents=True, exist_ok=True)
    # The stand-in headers come first: they replace torch's of the same names.
    command = [str(nvcc), "-O3", "-std=c++17", "-lineinfo", *flags,
               "-gencode", "arch=compute_90,code=sm_90", "-shared", "-Xcompiler", "-fPIC"]
    command += [f"-I{folder}" for folder in includes[:1]]
    command += [f"-I{Path(torch.__file__).parent / 'include'}"]
    command += [f"-I{folder}" for folder in includes[1:]] + [str(shim), "-o", str(library)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return f"{what} did not build:\n{done.stderr[-3000:]}"
    return f"built {library.relative_to(library.parents[1])} (sm_90): {what}"


def main() -> int:
    # Staged beside .peer/ and swapped in whole: a download that fails leaves the old one.
    staging = DEST.with_name(".peer.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    stage_mamba_ssm(staging)
    stage_vllm(staging)
    stage_causal_conv1d(staging)
    (staging / "VERSION").write_text(
        f"mamba_ssm {MAMBA_SSM}, vllm {VLLM}, causal-conv1d {CAUSAL_CONV1D}\n")
    scan_csrc, conv_csrc = staging / "vllm_csrc", staging / "causal_conv1d_csrc"
    print("stage_peers: " + build_library(
        "vLLM's Mamba-1 scan", scan_csrc / "mamba" / "peer_scan_shim.cu",
        [scan_csrc / "standin_include", scan_csrc / "mamba"], staging / SCAN_LIBRARY,
        VLLM_SCAN_FLAGS))
    dense_csrc = staging / "mamba_ssm_csrc"
    print("stage_peers: " + build_library(
        "mamba_ssm's Mamba-1 scan", dense_csrc / "peer_dense_scan_shim.cu",
        [dense_csrc / "standin_include", dense_csrc], staging / DENSE_SCAN_LIBRARY,
        DAO_AILAB_FLAGS))
    print("stage_peers: " + build_library(
        "causal-conv1d's convs (prefill and update)", conv_csrc / "peer_conv_shim.cu",
        [conv_csrc / "standin_include", conv_csrc], staging / CONV_LIBRARY,
        DAO_AILAB_FLAGS))
    shutil.rmtree(DEST, ignore_errors=True)
    staging.rename(DEST)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"stage_peers: mamba_ssm {MAMBA_SSM}, vllm {VLLM} and causal-conv1d {CAUSAL_CONV1D} "
          f"kernels in {DEST} ({size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
