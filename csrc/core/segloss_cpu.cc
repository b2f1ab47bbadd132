// CPU kernels: one pass over the data per direction.
//
// Structure of the forward pass. The elements are cut into fixed work items (a run
// of positions of one image, or of one (image, class) row for channels_first). An
// item is processed in blocks: the block's logits, labels and broadcast weights are
// converted to the compute type in small L1-resident buffers, then one loop evaluates
// ForwardTerms for every element and adds its 8 terms into 8 accumulator arrays of
// `period` lanes, lane j holding class j % C. That inner loop has contiguous loads,
// no branches and no gathers, so it vectorises (exp and log1p are polynomials).
// Each item's lanes are folded into per-class float64 partials; the partials are
// summed in item order, so the result does not depend on the thread count.
#include "segloss_cpu.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "dtypes.h"

namespace fused_segloss {
namespace {

constexpr int64_t kItemElements = 32768;  // elements per work item (fixed: determinism)
constexpr int64_t kBlockElements = 2048;  // elements per L1 block (rounded to the period)

// What one work item covers.
struct Item {
  int64_t batch, klass, begin, end;  // klass is -1 for channels_last (all classes)
};

Item ItemAt(const ProblemShape& shape, const StatsWorkPlan& plan, int64_t index) {
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

// Per-item view: element e of the item is flat element `base + e`, at position
// `begin + e / C` and class `e % C` (channels_last) or position `begin + e` and class
// `item.klass` (channels_first).
struct ItemGeometry {
  int64_t base;
  int64_t count;
  int64_t period;
};

ItemGeometry GeometryOf(const ProblemShape& shape, const Item& item, int64_t period) {
  ItemGeometry g;
  const int64_t width = shape.channels_last ? shape.classes : 1;
  const int64_t klass = shape.channels_last ? 0 : item.klass;
  g.base = ElementIndex(shape, item.batch, item.begin, klass);
  g.count = (item.end - item.begin) * width;
  g.period = period;
  return g;
}

int64_t ClassOfLane(const ProblemShape& shape, const Item& item, int64_t lane) {
  return shape.channels_last ? lane % shape.classes : item.klass;
}

int64_t BlockLength(int64_t period) {
  return std::max<int64_t>(1, kBlockElements / period) * period;
}

// Converts `count` storage values into the compute buffer (a no-op view for the
// compute type itself).
template <typename Compute, typename Storage>
const Compute* AsCompute(const Storage* src, int64_t count, std::vector<Compute>& buffer) {
  if constexpr (std::is_same_v<Compute, Storage>) {
    return src;
  } else {
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<Compute>(ToCompute(src[i]));
    return buffer.data();
  }
}

// Fills the block's weights (broadcast resolved) and counts invalid ones. Blocks start at
// a position boundary (their offset is a multiple of the period, itself a multiple of C).
template <typename Compute>
int64_t FillWeights(const SeglossProblem& p, const WeightStrides& strides, const Item& item,
                    int64_t offset, int64_t count, Compute* __restrict__ out) {
  if (p.weights == nullptr) {
    std::fill(out, out + count, Compute(1));
    return 0;
  }
  const ProblemShape& s = p.shape;
  const float* __restrict__ weights = p.weights;
  if (s.channels_last) {
    const int64_t first = item.begin + offset / s.classes;
    for (int64_t pos = 0; pos < count / s.classes; ++pos) {
      const float* row = weights + WeightIndex(strides, item.batch, first + pos, 0);
      Compute* dst = out + pos * s.classes;
      for (int64_t c = 0; c < s.classes; ++c) dst[c] = row[c * strides.klass];
    }
  } else {
    const float* row = weights + WeightIndex(strides, item.batch, item.begin + offset, item.klass);
    for (int64_t e = 0; e < count; ++e) out[e] = row[e * strides.position];
  }
  int64_t invalid = 0;
  for (int64_t e = 0; e < count; ++e) invalid += WeightIsValid(out[e]) ? 0 : 1;
  return invalid;
}

// The 8 accumulator columns, each `period` lanes. They are separate restrict pointers
// because gcc gives up vectorising when it must prove at run time that 8 slices of one
// array never overlap.
#define FSL_ACC_PARAMS(C)                                                              \
  C *__restrict__ ce, C *__restrict__ weight, C *__restrict__ inter, C *__restrict__ pred, \
      C *__restrict__ label_sum, C *__restrict__ hard_tp, C *__restrict__ hard_pred,     \
      C *__restrict__ hard_label
#define FSL_ACC_ARGS ce, weight, inter, pred, label_sum, hard_tp, hard_pred, hard_label

// The forward pass over one block: lane j accumulates the elements j, j + period, ...
// (A variant that summed 2 or 4 rows in registers before touching the accumulators
// measured no faster: the loop is bound by the exp/log1p/division arithmetic.)
template <typename Compute, bool kSquared>
int64_t AccumulateBlock(const Compute* __restrict__ x, const Compute* __restrict__ z,
                        const Compute* __restrict__ w, const Compute* __restrict__ pos_weight,
                        int64_t count, int64_t period, FSL_ACC_PARAMS(Compute)) {
  int64_t invalid_labels = 0;
  for (int64_t row = 0; row < count; row += period) {
    const int64_t lanes = std::min(period, count - row);
    for (int64_t j = 0; j < lanes; ++j) {
      Compute t[kNumStats];
      const int64_t i = row + j;
      ForwardTerms<Compute, kSquared>(x[i], z[i], w[i], pos_weight[j], t);
      invalid_labels += LabelIsValid(z[i]) ? 0 : 1;
      ce[j] += t[kCeSum];
      weight[j] += t[kWeightSum];
      inter[j] += t[kIntersection];
      pred[j] += t[kPredSum];
      label_sum[j] += t[kLabelSum];
      hard_tp[j] += t[kHardTp];
      hard_pred[j] += t[kHardPred];
      hard_label[j] += t[kHardLabel];
    }
  }
  return invalid_labels;
}

template <typename Compute, bool kSquared>
void GradientBlock(const Compute* __restrict__ x, const Compute* __restrict__ z,
                   const Compute* __restrict__ w, const Compute* __restrict__ pattern,
                   int64_t count, int64_t period, Compute* __restrict__ out) {
  // pattern is [4][period]: pos_weight, g_ce, g_inter, g_pred for each lane.
  for (int64_t row = 0; row < count; row += period) {
    const int64_t lanes = std::min(period, count - row);
    for (int64_t j = 0; j < lanes; ++j) {
      out[row + j] = LogitGradient<Compute, kSquared>(
          x[row + j], z[row + j], w[row + j], pattern[j], pattern[period + j],
          pattern[2 * period + j], pattern[3 * period + j]);
    }
  }
}

template <typename Compute>
int64_t CountNonFinite(const Compute* __restrict__ x, int64_t count) {
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Compute magnitude = x[i] < Compute(0) ? -x[i] : x[i];
    nonfinite += magnitude <= std::numeric_limits<Compute>::max() ? 0 : 1;  // NaN too
  }
  return nonfinite;
}

struct Counts {
  int64_t invalid_labels = 0, invalid_weights = 0, nonfinite_logits = 0;
};

std::string CountsError(const Counts& counts) {
  if (counts.nonfinite_logits > 0) {
    return "`logits` contain " + std::to_string(counts.nonfinite_logits) +
           " NaN or Inf value(s) (check_numerics=True)";
  }
  return InvalidValuesMessage(counts.invalid_labels, counts.invalid_weights);
}

template <typename LogitT, typename LabelT, bool kSquared>
std::string StatsImpl(const SeglossProblem& p, const ParallelFor& parallel_for, float* stats) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  const ProblemShape& s = p.shape;
  const StatsWorkPlan plan = MakeStatsWorkPlan(s);
  const int64_t period = AccumulatorPeriod(s);
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  std::vector<double> partials(plan.num_items * classes_per_item * kNumStats, 0.0);
  std::vector<Counts> item_counts(plan.num_items);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);

  auto run_items = [&](int64_t first, int64_t last) {
    const int64_t block = BlockLength(period);
    std::vector<Compute> x_buf(block), z_buf(block), w_buf(block);
    std::vector<Compute> pos_weight(period), acc(kNumStats * period);
    for (int64_t index = first; index < last; ++index) {
      const Item item = ItemAt(s, plan, index);
      const ItemGeometry g = GeometryOf(s, item, period);
      for (int64_t j = 0; j < period; ++j) {
        const int64_t c = ClassOfLane(s, item, j);
        pos_weight[j] = p.pos_weight ? Compute(p.pos_weight[c]) : Compute(1);
      }
      std::fill(acc.begin(), acc.end(), Compute(0));
      Counts& counts = item_counts[index];
      double* partial = partials.data() + index * classes_per_item * kNumStats;
      for (int64_t offset = 0; offset < g.count; offset += block) {
        const int64_t n = std::min(block, g.count - offset);
        const Compute* x = AsCompute(logits + g.base + offset, n, x_buf);
        const Compute* z = AsCompute(labels + g.base + offset, n, z_buf);
        counts.invalid_weights += FillWeights(p, strides, item, offset, n, w_buf.data());
        if (p.check_numerics) counts.nonfinite_logits += CountNonFinite(x, n);
        Compute* a = acc.data();
        counts.invalid_labels += AccumulateBlock<Compute, kSquared>(
            x, z, w_buf.data(), pos_weight.data(), n, period, a, a + period, a + 2 * period,
            a + 3 * period, a + 4 * period, a + 5 * period, a + 6 * period, a + 7 * period);
        // Fold the lanes into float64 after every block, so a float32 lane never sums
        // more than kBlockElements / period terms (accuracy on long runs of one value).
        for (int64_t j = 0; j < period; ++j) {
          const int64_t local_class = s.channels_last ? j % s.classes : 0;
          for (int k = 0; k < kNumStats; ++k) {
            partial[local_class * kNumStats + k] += static_cast<double>(acc[k * period + j]);
          }
        }
        std::fill(acc.begin(), acc.end(), Compute(0));
      }
    }
  };
  // Cost hint: ~10 ns per element.
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 10, run_items);

  Counts total;
  for (const Counts& c : item_counts) {
    total.invalid_labels += c.invalid_labels;
    total.invalid_weights += c.invalid_weights;
    total.nonfinite_logits += c.nonfinite_logits;
  }
  const std::string error = CountsError(total);
  if (!error.empty()) return error;

  // Combine partials in item order (fixed), then round to float32.
  std::vector<double> sums(s.batch * s.classes * kNumStats, 0.0);
  for (int64_t index = 0; index < plan.num_items; ++index) {
    const Item item = ItemAt(s, plan, index);
    const double* partial = partials.data() + index * classes_per_item * kNumStats;
    for (int64_t lc = 0; lc < classes_per_item; ++lc) {
      const int64_t c = s.channels_last ? lc : item.klass;
      double* dst = sums.data() + (item.batch * s.classes + c) * kNumStats;
      for (int k = 0; k < kNumStats; ++k) dst[k] += partial[lc * kNumStats + k];
    }
  }
  for (size_t i = 0; i < sums.size(); ++i) stats[i] = static_cast<float>(sums[i]);
  return "";
}

template <typename LogitT, typename LabelT, bool kSquared>
std::string GradImpl(const SeglossProblem& p, const float* grad_stats,
                     const ParallelFor& parallel_for, void* grad_out) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  const ProblemShape& s = p.shape;
  const StatsWorkPlan plan = MakeStatsWorkPlan(s);
  const int64_t period = AccumulatorPeriod(s);
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  auto* out = static_cast<LogitT*>(grad_out);

  auto run_items = [&](int64_t first, int64_t last) {
    const int64_t block = BlockLength(period);
    std::vector<Compute> x_buf(block), z_buf(block), w_buf(block), g_buf(block);
    std::vector<Compute> pattern(4 * period);
    for (int64_t index = first; index < last; ++index) {
      const Item item = ItemAt(s, plan, index);
      const ItemGeometry g = GeometryOf(s, item, period);
      for (int64_t j = 0; j < period; ++j) {
        const int64_t c = ClassOfLane(s, item, j);
        const float* upstream = grad_stats + (item.batch * s.classes + c) * kNumStats;
        pattern[j] = p.pos_weight ? Compute(p.pos_weight[c]) : Compute(1);
        pattern[period + j] = upstream[kCeSum];
        pattern[2 * period + j] = upstream[kIntersection];
        pattern[3 * period + j] = upstream[kPredSum];
      }
      for (int64_t offset = 0; offset < g.count; offset += block) {
        const int64_t n = std::min(block, g.count - offset);
        const Compute* x = AsCompute(logits + g.base + offset, n, x_buf);
        const Compute* z = AsCompute(labels + g.base + offset, n, z_buf);
        FillWeights(p, strides, item, offset, n, w_buf.data());
        LogitT* dst = out + g.base + offset;
        if constexpr (std::is_same_v<LogitT, Compute>) {
          GradientBlock<Compute, kSquared>(x, z, w_buf.data(), pattern.data(), n, period, dst);
        } else {
          GradientBlock<Compute, kSquared>(x, z, w_buf.data(), pattern.data(), n, period,
                                           g_buf.data());
          for (int64_t e = 0; e < n; ++e) dst[e] = FromCompute<LogitT>::Convert(g_buf[e]);
        }
      }
    }
  };
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 6, run_items);
  return "";
}

// dtype dispatch: one switch per dtype list, shared by both directions.
template <typename LogitT, template <typename, typename> class Fn, typename... Args>
std::string DispatchLabel(DType labels, Args&&... args) {
  switch (labels) {
    case DType::kFloat32: return Fn<LogitT, float>::Run(args...);
    case DType::kFloat64: return Fn<LogitT, double>::Run(args...);
    case DType::kFloat16: return Fn<LogitT, Half>::Run(args...);
    case DType::kBFloat16: return Fn<LogitT, BFloat16>::Run(args...);
    case DType::kUInt8: return Fn<LogitT, uint8_t>::Run(args...);
    case DType::kBool: return Fn<LogitT, bool>::Run(args...);
  }
  return "unsupported `labels` dtype";
}

template <template <typename, typename> class Fn, typename... Args>
std::string Dispatch(const SeglossProblem& p, Args&&... args) {
  switch (p.logits_dtype) {
    case DType::kFloat32: return DispatchLabel<float, Fn>(p.labels_dtype, p, args...);
    case DType::kFloat64: return DispatchLabel<double, Fn>(p.labels_dtype, p, args...);
    case DType::kFloat16: return DispatchLabel<Half, Fn>(p.labels_dtype, p, args...);
    case DType::kBFloat16: return DispatchLabel<BFloat16, Fn>(p.labels_dtype, p, args...);
    default: break;
  }
  return std::string("`logits` must be float16, bfloat16, float32 or float64, got ") +
         DTypeName(p.logits_dtype);
}

template <typename LogitT, typename LabelT>
struct StatsFn {
  static std::string Run(const SeglossProblem& p, const ParallelFor& pf, float* stats) {
    return p.squared ? StatsImpl<LogitT, LabelT, true>(p, pf, stats)
                     : StatsImpl<LogitT, LabelT, false>(p, pf, stats);
  }
};
template <typename LogitT, typename LabelT>
struct GradFn {
  static std::string Run(const SeglossProblem& p, const float* g, const ParallelFor& pf,
                         void* out) {
    return p.squared ? GradImpl<LogitT, LabelT, true>(p, g, pf, out)
                     : GradImpl<LogitT, LabelT, false>(p, g, pf, out);
  }
};

}  // namespace

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

std::string InvalidValuesMessage(int64_t invalid_labels, int64_t invalid_weights) {
  if (invalid_labels > 0) {
    return "`labels` must lie in [0, 1] (uint8 labels must be 0 or 1); found " +
           std::to_string(invalid_labels) + " value(s) outside that range or NaN";
  }
  if (invalid_weights > 0) {
    return "`weights` must be finite and >= 0; found " + std::to_string(invalid_weights) +
           " negative, infinite or NaN value(s)";
  }
  return "";
}

void SerialFor(int64_t n, int64_t /*cost_per_item*/, const RangeFn& fn) {
  if (n > 0) fn(0, n);
}

StatsWorkPlan MakeStatsWorkPlan(const ProblemShape& shape) {
  StatsWorkPlan plan;
  const int64_t width = shape.channels_last ? std::max<int64_t>(shape.classes, 1) : 1;
  plan.positions_per_item = std::max<int64_t>(1, kItemElements / width);
  plan.items_per_row = (shape.positions + plan.positions_per_item - 1) / plan.positions_per_item;
  const int64_t rows = shape.channels_last ? shape.batch : shape.batch * shape.classes;
  plan.num_items = rows * plan.items_per_row;
  return plan;
}

int64_t AccumulatorPeriod(const ProblemShape& shape) {
  constexpr int64_t kMinLanes = 16;
  if (!shape.channels_last) return kMinLanes;
  if (shape.classes >= kMinLanes) return shape.classes;
  return std::lcm(shape.classes, kMinLanes);
}

std::string ValidateProblem(const SeglossProblem& p) {
  const ProblemShape& s = p.shape;
  if (s.batch < 0 || s.positions < 0 || s.classes < 0) return "negative dimension in `logits`";
  if (s.classes == 0) return "`logits` must have at least one class (C >= 1), got C = 0";
  const int64_t total = s.batch * s.positions * s.classes;
  if (total > 0 && (p.logits == nullptr || p.labels == nullptr)) {
    return "`logits` and `labels` must not be null";
  }
  {  // absent weights keep the 1x1x1 defaults and pass
    const int64_t full[3] = {s.batch, s.positions, s.classes};
    const int64_t got[3] = {p.weights_batch, p.weights_positions, p.weights_classes};
    const char* names[3] = {"batch", "spatial", "class"};
    for (int i = 0; i < 3; ++i) {
      if (got[i] != 1 && got[i] != full[i]) {
        return std::string("`weights` ") + names[i] + " size " + std::to_string(got[i]) +
               " does not broadcast to the logits' " + std::to_string(full[i]);
      }
    }
  }
  return "";
}

std::string ValidatePosWeight(const SeglossProblem& p) {
  if (p.pos_weight == nullptr) return "";
  int64_t invalid = 0;
  for (int64_t c = 0; c < p.shape.classes; ++c) invalid += WeightIsValid(p.pos_weight[c]) ? 0 : 1;
  if (invalid == 0) return "";
  return "`pos_weight` must be finite and >= 0; found " + std::to_string(invalid) +
         " negative, infinite or NaN value(s)";
}

std::string ComputeStatsCpu(const SeglossProblem& problem, const ParallelFor& parallel_for,
                            float* stats_out) {
  std::string error = ValidateProblem(problem);
  if (error.empty()) error = ValidatePosWeight(problem);
  if (!error.empty()) return error;
  return Dispatch<StatsFn>(problem, parallel_for, stats_out);
}

std::string ComputeLogitGradCpu(const SeglossProblem& problem, const float* grad_stats,
                                const ParallelFor& parallel_for, void* grad_logits_out) {
  std::string error = ValidateProblem(problem);
  if (!error.empty()) return error;
  return Dispatch<GradFn>(problem, grad_stats, parallel_for, grad_logits_out);
}

}  // namespace fused_segloss
