// CPU forward pass: the [B, C, 8] statistics of one problem, for one (logits, labels)
// storage-type pair (instantiated for every pair at the end of this file).
//
// Operands: SeglossProblem (segloss_cpu.h). Output: float32 [B, C, 8], column k of
// (b, c) the sum over that image's and class's elements of the k-th forward term of
// segloss_math.h (ForwardTermsGivenExp: w·ce, w, w·z·p, w·p^k, w·z^k and the three hard
// counts), summed in float64 and rounded once to float32.
//
// Order of the sums (fixed, so the result is the same bit for bit for any thread count):
// each vector's terms go into float32 accumulators kept per vector position of the row
// (in L1); they are folded into per-lane float64 sums at the end of each block (at most
// kMaxBlockRows float32 terms per lane); the item's lanes are reduced to classes at its
// end; item partials are summed in item order. Invalid labels and weights, and with
// check_numerics non-finite logits, are counted and reported after the pass.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "segloss_cpu_blocks.h"
#include "segloss_cpu_counts.h"

namespace fused_segloss {
namespace cpu {
namespace {

template <typename Vec>
using MaskOf = decltype(Vec() > Vec());

template <typename Vec>
auto MaskOfFirst(int count) {
  return FirstLanes(count, static_cast<Vec*>(nullptr));
}

// Where every element's log term log1p(e) has weight 1 (no weight map, no pos_weight), the
// forward leaves it out of each element's cross-entropy and sums it per accumulator as a
// Log1pProductStep run, folded with one Log1pWide per block (segloss_math.h): 2 vector
// operations per element instead of Log1pUnit's polynomial, and off the exp -> log
// dependency chain. float32 compute only (float64 keeps the library log1p per element).
template <typename Vec, bool kWeighted, typename PosWeight>
constexpr bool kLogDeferred =
    !kWeighted && std::is_same_v<PosWeight, UnitPosWeight> && !std::is_same_v<Vec, double>;

// Accumulators per vector position of a row: the statistics, then the deferred log run.
constexpr int kLogRunSlot = kNumStats;
constexpr int kAccumulatorSlots = kNumStats + 1;

// The hard counts are added as masked adds of the weight (see AddTerms), so they are kept
// as masks; terms[kHardTp..kHardLabel] are left unused (and unevaluated when inlined).
template <typename Vec>
struct Contribution {
  Vec terms[kNumStats];
  Vec w;                                          // the weights (1 when unweighted)
  Vec e;                                          // exp(-|x|), when the log is deferred
  MaskOf<Vec> hard_tp, hard_pred, hard_label;     // where each hard count gets w
  MaskOf<Vec> invalid;                            // label outside [0, 1] (or NaN)
};

// The contributions of one vector of elements. `exp_ahead`, when given, is
// ExpOfNegativeAbs of this vector's logits, computed earlier (the pipeline in
// AccumulateBlock); else it is computed here.
template <typename Vec, bool kSquared, bool kWeighted, bool kPartial, typename LogitT,
          typename LabelT, typename PosWeight, typename Focal>
FSL_HD void ElementTerms(const LogitT* x, const LabelT* z, const float* w,
                         PosWeight pos_weight, Focal focal, int lanes, Contribution<Vec>& out,
                         const Vec* exp_ahead = nullptr) {
  const Vec zero(0.0f);
  constexpr bool kDefer = kLogDeferred<Vec, kWeighted, PosWeight>;
  const ElementInputs<Vec> in = LoadInputs<Vec, kWeighted, kPartial>(x, z, w, lanes);
  const Vec e = exp_ahead ? *exp_ahead : ExpOfNegativeAbs(in.x);
  ForwardTermsGivenExp<Vec, kSquared, PosWeight, kDefer, Focal>(in.x, e, in.z, in.w,
                                                                pos_weight, out.terms, &out.e,
                                                                focal);
  const auto pred_hard = PredictedPositive(in.x), label_hard = LabelPositive(in.z);
  out.w = in.w;
  out.hard_tp = pred_hard & label_hard;
  out.hard_pred = pred_hard;
  out.hard_label = label_hard;
  out.invalid = Not(LabelIsValid(in.z));
  if constexpr (kPartial) {  // padding lanes hold x = z = 0, w = 1: mask them out
    const auto live = MaskOfFirst<Vec>(lanes);
    for (int k = 0; k < kNumStats; ++k) out.terms[k] = Select(live, out.terms[k], zero);
    if constexpr (kDefer) out.e = Select(live, out.e, zero);  // D + 0 + D·0 = D
    out.hard_tp = out.hard_tp & live;
    out.hard_pred = out.hard_pred & live;
    out.hard_label = out.hard_label & live;
    out.invalid = out.invalid & live;
  }
}

// The terms of a partial vector (row ends only): kept out of line, so that each kernel
// instantiation holds one inlined copy of the per-element math for full vectors and one
// call for the rare partial ones (code size and build time, notably under sanitizers).
template <typename Vec, bool kSquared, bool kWeighted, typename LogitT, typename LabelT,
          typename PosWeight, typename Focal>
__attribute__((noinline)) void PartialElementTerms(const LogitT* x, const LabelT* z,
                                                   const float* w, PosWeight pos_weight,
                                                   Focal focal, int lanes,
                                                   Contribution<Vec>& out) {
  ElementTerms<Vec, kSquared, kWeighted, true>(x, z, w, pos_weight, focal, lanes, out);
}

// Adds one vector's contribution to its row position's accumulators. Labels outside
// [0, 1] only set lanes of `any_invalid`, a register for the whole block, and a block with
// any is counted exactly afterwards (rare: such input is an error), which keeps a per-lane
// count out of the inner loop. The hard counts: slot + (m ? w : 0) is m ? slot + w : slot
// (slots start at +0 and only grow, so adding 0 never changes one): one masked add with
// AVX-512 (simd.h's AddWhere).
template <typename Vec, bool kWeighted, bool kDefer>
FSL_HD void AddTerms(Vec* slots, const Contribution<Vec>& c, MaskOf<Vec>& any_invalid) {
  for (int k : {kCeSum, kIntersection, kPredSum, kLabelSum}) slots[k] += c.terms[k];
  if constexpr (kDefer) slots[kLogRunSlot] = Log1pProductStep(slots[kLogRunSlot], c.e);
  if constexpr (kWeighted) slots[kWeightSum] += c.terms[kWeightSum];  // else counted per item
  slots[kHardTp] = AddWhere(c.hard_tp, slots[kHardTp], c.w);
  slots[kHardPred] = AddWhere(c.hard_pred, slots[kHardPred], c.w);
  slots[kHardLabel] = AddWhere(c.hard_label, slots[kHardLabel], c.w);
  any_invalid = any_invalid | c.invalid;
}

template <typename LabelT>
int64_t CountInvalidLabels(const LabelT* z, int64_t count) {
  int64_t invalid = 0;
  for (int64_t e = 0; e < count; ++e) invalid += LabelIsValid(ToCompute(z[e])) ? 0 : 1;
  return invalid;
}

// Sums one block (whole rows; the last may be short) into per-lane float64 sums
// `lane_sums` ([kNumStats][padded]) and returns the number of invalid labels seen. Rows
// are walked in memory order, so the hardware prefetcher sees one sequential stream per
// input (a column-by-column walk with register accumulators would stride by a whole row
// on channels_last data). Each vector position of the row has its own float32
// accumulators `acc` ([vectors][kAccumulatorSlots], in L1). Full vectors are inlined; row
// ends go through the out-of-line partial function, in a separate statement so that the
// inlined terms never have their address taken (which would keep them on the stack).
template <typename Compute, bool kSquared, bool kWeighted, bool kPosWeighted, bool kFocal,
          typename LogitT, typename LabelT>
int64_t AccumulateBlock(const LogitT* x, const LabelT* z, const float* w, int64_t count,
                        const RowGeometry& g, const Compute* pos_weight_lanes,
                        const FocalOptions& focal_options,
                        typename Lanes<Compute, kForwardParts>::Vec* acc, double* lane_sums) {
  using Vec = typename Lanes<Compute, kForwardParts>::Vec;
  const auto focal = FocalFor<Vec, kFocal>(focal_options);
  constexpr int kWidth = Lanes<Compute, kForwardParts>::kWidth;
  using PosWeight = std::conditional_t<kPosWeighted, Vec, UnitPosWeight>;
  constexpr bool kDefer = kLogDeferred<Vec, kWeighted, PosWeight>;
  for (int64_t i = 0; i < g.vectors * kAccumulatorSlots; ++i) acc[i] = Vec(0.0f);
  MaskOf<Vec> any_invalid = Vec(0.0f) > Vec(0.0f);
  const int64_t full_vectors = g.period / kWidth;
  const int tail_lanes = static_cast<int>(g.period % kWidth);
  // The pos_weight lanes of vector v of a row, or UnitPosWeight (not loaded) without them.
  auto pos_weight_at = [&](int64_t v) {
    if constexpr (kPosWeighted) {
      return Load<Vec>(pos_weight_lanes + v * kWidth);
    } else {
      return UnitPosWeight{};
    }
  };
  auto partial = [&](int64_t i, int64_t v, int lanes) {
    Contribution<Vec> c;
    PartialElementTerms<Vec, kSquared, kWeighted>(x + i, z + i, WeightsAt<kWeighted>(w, i),
                                                  pos_weight_at(v), focal, lanes, c);
    AddTerms<Vec, kWeighted, kDefer>(acc + v * kAccumulatorSlots, c, any_invalid);
  };
  const int64_t full_rows = count / g.period, rest = count % g.period;
  // The full vectors of the full rows in memory order, software-pipelined: each iteration
  // first issues the exp of the next full vector, then the rest of its own terms from the
  // exp the previous iteration issued. Why: one vector's chain (exp, then 1/(1+e), the
  // sigmoid and the sums) is longer than the out-of-order core looks ahead, so the loop
  // would run at the chain's latency; split in two, each iteration's halves are
  // independent. The same operations on the same values (the sums bit for bit).
  const int64_t vectors = full_rows * full_vectors;
  Vec next_exp = vectors > 0 ? ExpOfNegativeAbs(Load<Vec>(x)) : Vec(0.0f);
  for (int64_t k = 0, i = 0, v = 0; k < vectors; ++k) {
    const Vec exp_ahead = next_exp;
    const bool row_ends = v + 1 == full_vectors;
    const int64_t step = row_ends ? kWidth + tail_lanes : kWidth;  // to the next full vector
    // (at the end this vector again: a harmless extra exp)
    next_exp = ExpOfNegativeAbs(Load<Vec>(x + (k + 1 < vectors ? i + step : i)));
    PrefetchInputs<kWidth, kWeighted>(x + i, z + i, WeightsAt<kWeighted>(w, i));
    Contribution<Vec> c;
    ElementTerms<Vec, kSquared, kWeighted, false>(x + i, z + i, WeightsAt<kWeighted>(w, i),
                                                  pos_weight_at(v), focal, kWidth, c,
                                                  &exp_ahead);
    AddTerms<Vec, kWeighted, kDefer>(acc + v * kAccumulatorSlots, c, any_invalid);
    if (row_ends) {
      if (tail_lanes > 0) partial(i + kWidth, full_vectors, tail_lanes);
      v = 0;
    } else {
      ++v;
    }
    i += step;
  }
  if (full_vectors == 0) {  // rows narrower than one vector: each is one partial vector
    for (int64_t r = 0; r < full_rows; ++r) partial(r * g.period, 0, tail_lanes);
  }
  for (int64_t v = 0; v * kWidth < rest; ++v) {  // the block's last, shorter row
    partial(full_rows * g.period + v * kWidth, v,
            static_cast<int>(std::min<int64_t>(kWidth, rest - v * kWidth)));
  }
  for (int64_t v = 0; v < g.vectors; ++v) {
    double* sums = lane_sums + v * kWidth;
    const Vec* slots = acc + v * kAccumulatorSlots;
    for (int k = 0; k < kNumStats; ++k) FoldInto(slots[k], sums + k * g.padded);
    if constexpr (kDefer) FoldInto(Log1pWide(slots[kLogRunSlot]), sums + kCeSum * g.padded);
  }
  return AnyLane(any_invalid) ? CountInvalidLabels(z, count) : 0;
}

template <typename LogitT, typename LabelT, bool kSquared, bool kWeighted, bool kPosWeighted,
          bool kFocal = false>
std::string StatsImpl(const SeglossProblem& p, const ParallelFor& parallel_for, float* stats) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  const ProblemShape& s = p.shape;
  const StatsWorkPlan plan = MakeStatsWorkPlan(s);
  const RowGeometry geo = MakeRowGeometry<Compute, kForwardParts>(s);
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  std::vector<double> partials(plan.num_items * classes_per_item * kNumStats, 0.0);
  std::vector<ForwardCounts> item_counts(plan.num_items);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);

  auto run_items = [&](int64_t first, int64_t last) {
    const int64_t block = geo.block_rows * geo.period;
    std::vector<float> w_buf(kWeighted ? block : 0);
    std::vector<Compute> pos_weight(kPosWeighted ? geo.padded : 0, Compute(0));
    std::vector<double> lane_sums(kNumStats * geo.padded);
    std::vector<typename Lanes<Compute, kForwardParts>::Vec> acc(geo.vectors *
                                                                 kAccumulatorSlots);
    for (int64_t index = first; index < last; ++index) {
      const Item item = ItemAt(s, plan, index);
      const ItemSpan span = SpanOf(s, item);
      if constexpr (kPosWeighted) {
        ForEachLaneClass(s, item, geo.period, [&](int64_t j, int64_t c) {
          pos_weight[j] = p.pos_weight ? Compute(p.pos_weight[c]) : Compute(1);
        });
      }
      std::fill(lane_sums.begin(), lane_sums.end(), 0.0);
      ForwardCounts& counts = item_counts[index];
      for (int64_t offset = 0; offset < span.count; offset += block) {
        const int64_t n = std::min(block, span.count - offset);
        const LogitT* x = logits + span.base + offset;
        const LabelT* z = labels + span.base + offset;
        const float* w = nullptr;
        if constexpr (kWeighted) {
          int64_t invalid = 0;
          w = BlockWeights(p, strides, item, offset, n, w_buf.data(), &invalid);
          counts.invalid_weights += invalid;
        }
        if (p.check_numerics) counts.nonfinite_logits += CountNonFinite(x, n);
        counts.invalid_labels +=
            AccumulateBlock<Compute, kSquared, kWeighted, kPosWeighted, kFocal>(
                x, z, w, n, geo, pos_weight.data(), p.focal, acc.data(), lane_sums.data());
      }
      // Lanes -> the item's classes, C lanes at a time (the period is a multiple of C
      // for channels_last; channels_first has one class per item), each class's lanes
      // still added in lane order (no modulo per lane).
      double* partial = partials.data() + index * classes_per_item * kNumStats;
      for (int64_t first_lane = 0; first_lane < geo.period; first_lane += classes_per_item) {
        for (int64_t lc = 0; lc < classes_per_item; ++lc) {
          for (int k = 0; k < kNumStats; ++k) {
            partial[lc * kNumStats + k] += lane_sums[k * geo.padded + first_lane + lc];
          }
        }
      }
      if constexpr (!kWeighted) {  // every element has weight 1
        for (int64_t lc = 0; lc < classes_per_item; ++lc) {
          partial[lc * kNumStats + kWeightSum] = static_cast<double>(item.end - item.begin);
        }
      }
    }
  };
  // Cost hint: about 2 units per element.
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 2, run_items);

  ForwardCounts total;
  for (const ForwardCounts& c : item_counts) total.Add(c);
  const std::string error = ForwardCountsMessage(p, total);
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

}  // namespace

template <typename LogitT, typename LabelT>
std::string StatsForTypes(const SeglossProblem& p, const ParallelFor& parallel_for,
                          float* stats) {
  // Without pos_weight the forward takes the short cross-entropy (CrossEntropyExceptLog in
  // segloss_math.h), a compile-time variant of its own. Not for float64 logits, whose
  // one-lane loop is bound by its library exp and log1p: there the variant would only add
  // build time.
  constexpr bool kShortCrossEntropy =
      !std::is_same_v<typename ComputeTypeOf<LogitT>::type, double>;
  // The focal variant (its own instantiation, so that the plain one is untouched) always
  // takes the pos_weight lanes (ones without pos_weight) and the per-element log.
  return WithVariant(p, [&](auto squared, auto weighted) {
    if (FocalEnabled(p.focal)) {
      return StatsImpl<LogitT, LabelT, squared.value, weighted.value, true, true>(
          p, parallel_for, stats);
    }
    if constexpr (kShortCrossEntropy) {
      if (p.pos_weight == nullptr) {
        return StatsImpl<LogitT, LabelT, squared.value, weighted.value, false>(p, parallel_for,
                                                                               stats);
      }
    }
    return StatsImpl<LogitT, LabelT, squared.value, weighted.value, true>(p, parallel_for,
                                                                          stats);
  });
}

#define FSL_INSTANTIATE_STATS(LabelT, LogitT)                                        \
  template std::string StatsForTypes<LogitT, LabelT>(const SeglossProblem&,          \
                                                     const ParallelFor&, float*);
#define FSL_INSTANTIATE_STATS_FOR_LOGITS(LogitT, unused) \
  FSL_FOR_EACH_LABEL_TYPE(FSL_INSTANTIATE_STATS, LogitT)
FSL_FOR_EACH_LOGIT_TYPE(FSL_INSTANTIATE_STATS_FOR_LOGITS, unused)
#undef FSL_INSTANTIATE_STATS_FOR_LOGITS
#undef FSL_INSTANTIATE_STATS

}  // namespace cpu
}  // namespace fused_segloss
