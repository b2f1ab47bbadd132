// TF-free launcher API of the fused_segloss CUDA kernels: the [B, C, 8] statistics
// (LaunchStats) and their gradient with respect to the logits (LaunchLogitGrad), with the
// same operands, per-element math (segloss_math.h; segloss_softmax_math.h for
// activation = softmax, dense or sparse labels) and error messages as the CPU kernels.
//
// Callers: the TF DEVICE_GPU OpKernels (csrc/tf/segloss_kernels_gpu.cc), the XLA "CUDA"
// FFI handlers (csrc/tf/segloss_xla_ffi.cc) and the standalone library used by
// tests/gpu/check_gpu.py. This header needs no CUDA or TF include: streams travel as
// `void*` (a cudaStream_t), results as an int status code.
//
// All pointers inside the SeglossProblem (logits, labels, weights, pos_weight) and the
// output / grad_stats pointers are DEVICE pointers on the stream's device. The problem
// uses the same canonical weights view as the CPU kernels ([Bw, Nw, Cw] channels_last,
// [Bw, Cw, Nw] channels_first, every axis 1 or full).
#pragma once

#include <cstddef>
#include <cstdint>

#include "segloss_cpu.h"  // fused_segloss::SeglossProblem (a plain struct)

namespace fused_segloss {
namespace cuda {

// Status codes returned by the launchers (0 = success).
enum Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // shapes, dtypes, pointers or workspace size (message names it)
  kInvalidValues = 2,    // labels outside [0, 1], class ids outside [0, C) (and not
                         // ignore_index), or weights negative / inf / NaN
  kCudaError = 3,        // a CUDA runtime call or kernel launch failed
};

// The text of a status returned on this thread: the detailed message of the most
// recent failure with that code on this thread (e.g. how many labels were invalid),
// otherwise a generic description. Never null; valid until the next launcher call on
// this thread.
const char* ErrorMessage(int code);

struct StatsOptions {
  // Device scratch of at least StatsWorkspaceBytes(problem) bytes, 16-byte aligned
  // (framework allocators give 256). If null, the launcher allocates it with
  // cudaMallocAsync on the stream and frees it the same way; frameworks that reserve
  // most of the GPU memory (TF, XLA) should pass their own scratch instead.
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Count invalid labels / weights on the device (like the CPU kernel) and report them
  // as kInvalidValues. This copies four counters back and SYNCHRONISES THE STREAM once
  // per call; with false the launch is fully asynchronous and invalid values silently
  // yield meaningless (but finite-or-NaN, never out-of-bounds) statistics.
  bool check_values = true;
};

// Scratch needed by LaunchStats: the per-block partial sums and two counters.
size_t StatsWorkspaceBytes(const SeglossProblem& problem);

// stats_out: device float32 [B, C, 8]. Deterministic: the same inputs on the same
// GPU model give bitwise identical results (fixed per-block partials combined in a
// fixed order; no floating-point atomics).
int LaunchStats(const SeglossProblem& problem, float* stats_out, void* stream,
                const StatsOptions& options = StatsOptions());

// grad_stats: device float32 [B, C, 8] (dL/dstats). grad_logits_out: device buffer with
// the logits' shape and dtype. Fully asynchronous (no check of the label values: the
// forward pass checked them).
int LaunchLogitGrad(const SeglossProblem& problem, const float* grad_stats,
                    void* grad_logits_out, void* stream);

}  // namespace cuda
}  // namespace fused_segloss
