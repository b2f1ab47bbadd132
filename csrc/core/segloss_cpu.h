// Framework-free CPU kernels of fused_segloss: the [B, C, 8] statistics and their
// gradient with respect to the logits. Used by the TF OpKernels, the XLA FFI handlers
// and the pybind11 module; each supplies its own thread pool through ParallelFor.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "segloss_math.h"

namespace fused_segloss {

enum class DType : int { kFloat32 = 0, kFloat64, kFloat16, kBFloat16, kUInt8, kBool };

const char* DTypeName(DType dtype);

// One call's inputs. Pointers are to dense row-major buffers.
struct SeglossProblem {
  ProblemShape shape;  // logits viewed as [B, N, C] or [B, C, N]
  DType logits_dtype = DType::kFloat32;
  const void* logits = nullptr;
  DType labels_dtype = DType::kFloat32;
  const void* labels = nullptr;  // same shape as logits
  // Optional float32 weights in the canonical view of the logits' layout, each axis
  // 1 (broadcast) or full: [Bw, Nw, Cw] (channels_last) or [Bw, Cw, Nw] (channels_first).
  const float* weights = nullptr;
  int64_t weights_batch = 1, weights_positions = 1, weights_classes = 1;
  const float* pos_weight = nullptr;  // optional [C]
  bool squared = false;
  // Raise on NaN/Inf logits (counted during the forward pass) instead of propagating.
  bool check_numerics = false;
};

// Runs fn(begin, end) over disjoint ranges covering [0, n), possibly concurrently.
// cost_per_item is a hint (nanoseconds-ish) for the pool's splitting.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = std::function<void(int64_t n, int64_t cost_per_item, const RangeFn& fn)>;

// A ParallelFor that runs everything on the calling thread.
void SerialFor(int64_t n, int64_t cost_per_item, const RangeFn& fn);

// Checks shapes, dtypes and pointers. Returns "" when valid, else a message that
// names the argument and what was expected. Reads no data (pointers may be on a device).
std::string ValidateProblem(const SeglossProblem& problem);

// The error for invalid values found during a pass ("" when both counts are 0); shared
// with the CUDA launcher so that both devices report the same message.
std::string InvalidValuesMessage(int64_t invalid_labels, int64_t invalid_weights);

// Checks the host-side pos_weight values (finite, >= 0). Returns "" or a message.
std::string ValidatePosWeight(const SeglossProblem& problem);

// An optional second output of the forward pass, for float labels: every label as one
// byte (1 where it is exactly 1, else 0) in the labels' layout, and whether every label
// was exactly 0 or 1. Where it was, the gradient pass reads these bytes as uint8 labels
// instead of the float labels (the same gradient bit for bit, 1 byte read per element
// instead of 2-8); otherwise the bytes are not to be used. `data` holds one byte per
// element of the labels.
struct LabelBytes {
  uint8_t* data = nullptr;
  bool all_binary = false;  // set by the pass
};

// stats_out: float32 [B, C, 8]. Returns "" or an error message (invalid labels or
// weights are detected during the pass). Bitwise deterministic for any ParallelFor:
// the work is cut into fixed items whose partial sums are combined in a fixed order.
// label_bytes: optional (see LabelBytes); float labels only.
std::string ComputeStatsCpu(const SeglossProblem& problem, const ParallelFor& parallel_for,
                            float* stats_out, LabelBytes* label_bytes = nullptr);

// grad_stats: float32 [B, C, 8] (dL/dstats). grad_logits_out: same shape and dtype as
// the logits. Returns "" or an error message.
std::string ComputeLogitGradCpu(const SeglossProblem& problem, const float* grad_stats,
                                const ParallelFor& parallel_for, void* grad_logits_out);

// The fixed partition of the forward pass into work items (exposed for tests).
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
