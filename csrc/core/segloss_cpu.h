// Framework-free CPU kernels of fused_segloss: the [B, C, 8] statistics and their
// gradient with respect to the logits, one pass over the data per direction. Used by the
// TF OpKernels, the XLA FFI handlers and the pybind11 module; each supplies its own
// thread pool through ParallelFor.
//
// Operands (SeglossProblem): logits and labels viewed as [B, N, C] (channels_last) or
// [B, C, N] (channels_first), N the product of the spatial dims; optional float32 weights
// in the same canonical view with every axis 1 (broadcast) or full; optional float32
// pos_weight [C]. The statistics columns and the per-element formulas (forward terms and
// dL/dx) are defined in segloss_math.h.
//
// Files: segloss_cpu.cc (checks, dtype dispatch, the work plan), segloss_cpu_forward.cc
// (statistics), segloss_cpu_grad.cc (gradient), segloss_cpu_blocks.h (the partition and
// input loads both passes share), segloss_cpu_lanes.h and simd.h (SIMD lanes); softmax
// mode: segloss_cpu_softmax_forward.cc, segloss_cpu_softmax_grad.cc and their shared
// partition and staging, segloss_cpu_softmax.h; both forward passes' invalid-value counts
// and their message, segloss_cpu_counts.h.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "dtypes.h"
#include "segloss_math.h"

namespace fused_segloss {

// One call's inputs. Pointers are to dense row-major buffers.
struct SeglossProblem {
  ProblemShape shape;  // logits viewed as [B, N, C] or [B, C, N]
  DType logits_dtype = DType::kFloat32;
  const void* logits = nullptr;
  DType labels_dtype = DType::kFloat32;
  const void* labels = nullptr;  // same shape as logits, or [B, N] class ids (sparse_labels)
  // Optional float32 weights in the canonical view of the logits' layout, each axis
  // 1 (broadcast) or full: [Bw, Nw, Cw] (channels_last) or [Bw, Cw, Nw] (channels_first).
  const float* weights = nullptr;
  int64_t weights_batch = 1, weights_positions = 1, weights_classes = 1;
  const float* pos_weight = nullptr;  // optional [C]
  bool squared = false;
  // sigmoid: independent classes (segloss_math.h); softmax: one class per pixel
  // (segloss_softmax_math.h). pos_weight and focal.alpha are sigmoid-only.
  Activation activation = Activation::kSigmoid;
  // Softmax only: labels are class ids [B, N] (uint8, int32 or int64), never expanded to
  // one-hot. A position whose id equals ignore_index (when has_ignore_index) has weight 0
  // for every class; any other id outside [0, C) is invalid (InvalidClassIdsMessage).
  bool sparse_labels = false;
  bool has_ignore_index = false;
  int64_t ignore_index = 0;
  // The focal modulation of ce_sum (segloss_focal_math.h); the default is plain ce.
  FocalOptions focal;
  // Raise on NaN/Inf logits (counted during the forward pass) instead of propagating.
  bool check_numerics = false;
};

// Runs fn(begin, end) over disjoint ranges covering [0, n), possibly concurrently.
// cost_per_item is a hint (nanoseconds-ish) for the pool's splitting.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t n, int64_t cost_per_item, const RangeFn& fn)>;

// A ParallelFor that runs everything on the calling thread.
void SerialFor(int64_t n, int64_t cost_per_item, const RangeFn& fn);

// Checks shapes and pointers. Returns "" when valid, else a message that names the
// argument and what was expected. Reads no data (pointers may be on a device).
std::string ValidateProblem(const SeglossProblem& problem);

// The error for invalid values found during a pass ("" when both counts are 0); shared
// with the CUDA launcher so that both devices report the same message.
std::string InvalidValuesMessage(int64_t invalid_labels, int64_t invalid_weights);

// The error for invalid class ids found during a sparse pass ("" when count is 0): how
// many, the smallest and largest of them, C and ignore_index. Shared with the CUDA launcher.
std::string InvalidClassIdsMessage(const SeglossProblem& problem, int64_t count, int64_t min_bad,
                                   int64_t max_bad);

// Checks the host-side pos_weight values (finite, >= 0). Returns "" or a message.
std::string ValidatePosWeight(const SeglossProblem& problem);

// stats_out: float32 [B, C, 8]. Returns "" or an error message (invalid labels or
// weights are detected during the pass). Bitwise deterministic for any ParallelFor:
// the work is cut into fixed items whose partial sums are combined in a fixed order.
std::string ComputeStatsCpu(const SeglossProblem& problem, const ParallelFor& parallel_for,
                            float* stats_out);

// grad_stats: float32 [B, C, 8] (dL/dstats). grad_logits_out: same shape and dtype as
// the logits (it may be the logits' own buffer). Returns "" or an error message.
std::string ComputeLogitGradCpu(const SeglossProblem& problem, const float* grad_stats,
                                const ParallelFor& parallel_for, void* grad_logits_out);

// The fixed partition of both passes into work items (exposed for tests).
struct StatsWorkPlan {
  int64_t positions_per_item = 0;
  int64_t items_per_row = 0;  // per image (channels_last) or per (image, class)
  int64_t num_items = 0;
};
StatsWorkPlan MakeStatsWorkPlan(const ProblemShape& shape);

// The lane period of the kernels ("row" length): lane j of every row holds the same class.
// channels_last: lcm(C, SIMD width) when that is at most 16 vectors, else C (the row's
// last vector partial); channels_first: the SIMD width.
int64_t AccumulatorPeriod(const ProblemShape& shape);

}  // namespace fused_segloss
