// Internal to the CPU kernels: the partition of a problem into work items, blocks and rows,
// the block's weights, and the vector loads that both passes (segloss_cpu_forward.cc,
// segloss_cpu_grad.cc) share. Host only; not for the framework adapters.
//
// Partition. The elements are cut into fixed work items (a run of positions of one image,
// or of one (image, class) row for channels_first), and an item into blocks of whole
// "rows". A row is `period` consecutive elements whose classes repeat from row to row
// (channels_last: a multiple of C, or C; channels_first: one class), so lane j of a row
// always belongs to the same class. Rows are processed as SIMD vectors of
// Lanes<Compute, kParts>::kWidth lanes (segloss_cpu_lanes.h); the last vector of a row is
// partial when the period is not a multiple of the width. The item boundaries depend on
// the shape only, never on the thread count: that makes the forward's sums deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "dtypes.h"
#include "segloss_cpu.h"
#include "segloss_cpu_lanes.h"
#include "segloss_math.h"

namespace fused_segloss {
namespace cpu {

constexpr int64_t kItemElements = 32768;  // elements per work item (fixed: determinism)
// Rows per block: about kBlockElements elements, and at most kMaxBlockRows, so a float32
// lane never sums more than that many terms before it is folded into float64 (accuracy on
// long runs of one value). At most 120 rows also keeps a deferred log run's
// 1 + D <= 2^rows finite in float32 (Log1pProductStep in segloss_math.h). The block is
// large so that its closing fold of every accumulator stays a small part of the pass.
constexpr int64_t kBlockElements = 8192;
constexpr int64_t kMaxBlockRows = 120;
constexpr int64_t kMinBlockRows = 8;

// Hardware vectors per compute vector (simd.h): interleaving two independent chains keeps
// more work in flight. The gradient always does; the forward, whose accumulators take
// registers too, only where there are 32 vector registers (AVX-512).
constexpr int kForwardParts = kHardwareLanes == 16 ? 2 : 1;
constexpr int kGradientParts = 2;

// What one work item covers.
struct Item {
  int64_t batch, klass, begin, end;  // klass is -1 for channels_last (all classes)
};

inline Item ItemAt(const ProblemShape& shape, const StatsWorkPlan& plan, int64_t index) {
  Item item;
  const int64_t row = index / plan.items_per_row;
  const int64_t chunk = index % plan.items_per_row;
  item.begin = chunk * plan.positions_per_item;
  item.end = std::min(shape.positions, item.begin + plan.positions_per_item);
  if (shape.channels_last) {
    item.batch = row;
    item.klass = -1;
  } else {
    item.batch = row / shape.classes;
    item.klass = row % shape.classes;
  }
  return item;
}

// The lane geometry shared by every item of a problem.
struct RowGeometry {
  int64_t period;       // elements per row
  int64_t vectors;      // vectors per row (the last may be partial)
  int64_t padded;       // vectors * width: lanes of the per-lane arrays
  int64_t block_rows;   // rows per block
};

template <typename Compute, int kParts>
RowGeometry MakeRowGeometry(const ProblemShape& s) {
  const int64_t width = Lanes<Compute, kParts>::kWidth;
  RowGeometry g;
  g.period = AccumulatorPeriod(s);
  g.vectors = (g.period + width - 1) / width;
  g.padded = g.vectors * width;
  g.block_rows = std::clamp(kBlockElements / g.period, kMinBlockRows, kMaxBlockRows);
  return g;
}

// Flat index of the item's first element and its element count.
struct ItemSpan {
  int64_t base, count;
};

inline ItemSpan SpanOf(const ProblemShape& shape, const Item& item) {
  const int64_t width = shape.channels_last ? shape.classes : 1;
  const int64_t klass = shape.channels_last ? 0 : item.klass;
  return {ElementIndex(shape, item.batch, item.begin, klass), (item.end - item.begin) * width};
}

// fn(lane, class) for each lane of a row: lane j holds class j % C (channels_last) or the
// item's class. Counted, not divided (no 64-bit modulo per lane).
template <typename Fn>
void ForEachLaneClass(const ProblemShape& shape, const Item& item, int64_t period, Fn&& fn) {
  for (int64_t lane = 0, klass = 0; lane < period; ++lane) {
    fn(lane, shape.channels_last ? klass : item.klass);
    if (++klass == shape.classes) klass = 0;
  }
}

inline int64_t CountInvalidWeights(const float* w, int64_t count) {
  int64_t invalid = 0;
  for (int64_t e = 0; e < count; ++e) invalid += WeightIsValid(w[e]) ? 0 : 1;
  return invalid;
}

// The block's `count` weights (broadcast resolved), in element order. Blocks start at a
// position boundary (their offset is a multiple of the period, itself a multiple of C).
// Where the map's values for the block are contiguous (a full map; channels_first broadcast
// over classes; C = 1) the map itself is returned, with no copy; a map broadcast over the
// classes of channels_last data is expanded into `buffer` with vector permutes
// (RepeatEach), since an element-by-element fill would cost as much as the per-element
// math; other broadcasts fill `buffer` element by element.
// When `invalid` is given it gets the number of invalid weights among the block's
// elements (a broadcast value counts once per element it covers, as on the GPU).
inline const float* BlockWeights(const SeglossProblem& p, const WeightStrides& strides,
                                 const Item& item, int64_t offset, int64_t count,
                                 float* buffer, int64_t* invalid) {
  const ProblemShape& s = p.shape;
  const int64_t classes = s.channels_last ? s.classes : 1;
  const int64_t positions = count / classes;
  const int64_t first = item.begin + offset / classes;
  const float* row =
      p.weights + WeightIndex(strides, item.batch, first, s.channels_last ? 0 : item.klass);
  // (channels_last with C = 1 has class stride 0 and position stride 1: in place too)
  const bool per_element =
      s.channels_last ? strides.position == classes && (strides.klass == 1 || classes == 1)
                      : strides.position == 1;
  const bool per_position = s.channels_last && strides.klass == 0 && strides.position == 1;
  const bool one_value = strides.position == 0 && (!s.channels_last || strides.klass == 0);
  const float* values = buffer;
  int64_t bad = 0;
  if (per_element) {
    values = row;
    if (invalid) bad = CountInvalidWeights(row, count);
  } else if (per_position) {
    RepeatEach(row, classes, count, buffer);
    if (invalid) bad = classes * CountInvalidWeights(row, positions);
  } else if (one_value) {
    std::fill(buffer, buffer + count, row[0]);
    if (invalid) bad = WeightIsValid(row[0]) ? 0 : count;
  } else {  // channels_last, one weight per class of each image: [B, 1, C]
    for (int64_t pos = 0; pos < positions; ++pos) {
      for (int64_t c = 0; c < classes; ++c) buffer[pos * classes + c] = row[c];
    }
    if (invalid) bad = CountInvalidWeights(buffer, count);
  }
  if (invalid) *invalid = bad;
  return values;
}

// The block's weights at element i (no pointer arithmetic on the null buffer when unweighted).
template <bool kWeighted>
const float* WeightsAt(const float* w, int64_t i) {
  return kWeighted ? w + i : nullptr;
}

// The streams of a vector's logits, labels and (when weighted) weights, prefetched ahead
// (PrefetchAhead in segloss_cpu_lanes.h).
template <int kWidth, bool kWeighted, typename LogitT, typename LabelT>
void PrefetchInputs(const LogitT* x, const LabelT* z, const float* w) {
  PrefetchAhead<kWidth>(x);
  PrefetchAhead<kWidth>(z);
  if constexpr (kWeighted) PrefetchAhead<kWidth>(w);
}

// The logits, labels and weights of one vector (weights 1 when unweighted); the first
// `lanes` lanes only, the rest 0, when kPartial.
template <typename Vec>
struct ElementInputs {
  Vec x, z, w;
};

template <typename Vec, bool kWeighted, bool kPartial, typename LogitT, typename LabelT>
FSL_HD ElementInputs<Vec> LoadInputs(const LogitT* x, const LabelT* z, const float* w,
                                     int lanes) {
  if constexpr (kPartial) {
    return {LoadPartial<Vec>(x, lanes), LoadPartial<Vec>(z, lanes),
            kWeighted ? LoadPartial<Vec>(w, lanes) : Vec(1.0f)};
  } else {
    return {Load<Vec>(x), Load<Vec>(z), kWeighted ? Load<Vec>(w) : Vec(1.0f)};
  }
}

// Squared Dice and the presence of a weight map are compile-time variants (no weights:
// no per-element weight loads or multiplies, and the weight sum is the element count).
// Calls fn(squared, weighted) with both as std::bool_constant, one choice for both passes.
template <typename Fn>
std::string WithVariant(const SeglossProblem& p, Fn&& fn) {
  using Yes = std::true_type;
  using No = std::false_type;
  const bool weighted = p.weights != nullptr;
  if (p.squared) return weighted ? fn(Yes{}, Yes{}) : fn(Yes{}, No{});
  return weighted ? fn(No{}, Yes{}) : fn(No{}, No{});
}

// The two passes for one (logits, labels) storage-type pair, instantiated for every pair
// of dtypes.h's lists in segloss_cpu_forward.cc and segloss_cpu_grad.cc; segloss_cpu.cc
// validates the problem and picks the pair (DispatchDTypes).
template <typename LogitT, typename LabelT>
std::string StatsForTypes(const SeglossProblem& p, const ParallelFor& parallel_for,
                          float* stats);
template <typename LogitT, typename LabelT>
std::string LogitGradForTypes(const SeglossProblem& p, const float* grad_stats,
                              const ParallelFor& parallel_for, void* grad_out);

}  // namespace cpu
}  // namespace fused_segloss
