// CPU forward pass of softmax mode: the [B, C, 8] statistics of one problem, for one
// (logits, labels) storage-type pair, dense labels or sparse class ids (instantiated for
// every pair at the end of this file).
//
// Operands: SeglossProblem (segloss_cpu.h), activation = softmax. Output: float32
// [B, C, 8], column k of (b, c) the sum over image b's positions of the k-th term of class
// c (SoftmaxForwardTerms in segloss_softmax_math.h: w·z·f·(-log p), w·z, w·z·p, w·p^k,
// w·z^k and the three hard counts, with the argmax prediction).
//
// One pass: per vector of positions (segloss_cpu_softmax.h stages them [C][kWidth]), the
// normaliser (max, argmax, log s, 1/s) of every lane, keeping exp(x - m) per class, then
// every class's eight terms from those.
//
// Order of the sums (fixed, so the result is the same bit for bit for any thread count):
// each class's terms go into float32 accumulators [C][8], one lane per hardware lane; every
// kFoldPositions positions (and at the item's end) each accumulator's lanes are added in
// float64 into the item's partial sums; item partials are summed in item order and rounded
// once to float32. Why float32 suffices per accumulator: each lane adds at most
// kFoldPositions / kHardwareLanes = 64 non-negative terms before it is folded, so its
// relative rounding error is at most 63·2^-24 < 4e-6 whatever the size of the image
// (float64 logits accumulate in float64).
//
// Invalid input, counted during the pass and reported after it: class ids outside [0, C)
// that are not ignore_index (InvalidClassIdsMessage), dense labels outside [0, 1] or NaN
// and invalid weights (InvalidValuesMessage), and with check_numerics non-finite logits.
#include <algorithm>
#include <vector>

#include "segloss_cpu_softmax.h"

namespace fused_segloss {
namespace cpu {
namespace {

constexpr int64_t kFoldPositions = 64 * kHardwareLanes;

template <typename Vec>
using MaskOf = decltype(Vec() > Vec());

// The staged vector and the forward's per-class accumulators ([C][8]).
template <typename Compute, typename Acc>
struct ForwardScratch : StagedVector<Compute> {
  ForwardScratch(int64_t classes, bool sparse, bool weighted)
      : StagedVector<Compute>(classes, sparse, weighted), acc(classes * kNumStats, Acc(0.0f)) {}
  std::vector<Acc> acc;
};

// Adds one staged vector's terms to the accumulators; returns whether any dense label lane
// is invalid (outside [0, 1] or NaN). The padding lanes have weight 0 and add +0.
template <typename Compute, bool kSparse, bool kFocal, typename Acc>
bool AccumulateVector(int64_t classes, bool squared, Compute gamma_value, bool by_class,
                      ForwardScratch<Compute, Acc>& b) {
  using Vec = SoftmaxVec<Compute>;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const SoftmaxPixel<Vec> px = NormaliseStaged<Vec>(classes, b);
  const Vec keep = Load<Vec>(b.keep.data());
  const Vec ids = kSparse ? Load<Vec>(b.z.data()) : Vec(0.0f);
  const Vec gamma(gamma_value);
  MaskOf<Vec> invalid = Vec(0.0f) > Vec(0.0f);
  for (int64_t c = 0; c < classes; ++c) {
    const Vec klass(static_cast<float>(c));
    const SoftmaxClass<Vec> cls = SoftmaxClassGivenExp(Load<Vec>(b.x.data() + c * kWidth),
                                                       Load<Vec>(b.e.data() + c * kWidth), px);
    const Vec z = StagedLabel<kSparse>(b, ids, c);
    if constexpr (!kSparse) invalid = invalid | Not(LabelIsValid(z));
    const Vec w = StagedWeight(b, keep, by_class, c);
    Vec terms[kNumStats];
    SoftmaxForwardTerms(cls, z, w, klass, px, squared, kFocal, gamma, terms);
    Acc* slots = b.acc.data() + c * kNumStats;
    for (int k = 0; k < kNumStats; ++k) slots[k] += SumParts(terms[k]);
  }
  return AnyLane(invalid);
}

// Counts the invalid dense labels of a staged vector (n live positions).
template <typename Compute>
int64_t CountInvalidStagedLabels(const Compute* z, int64_t classes, int64_t n) {
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  int64_t invalid = 0;
  for (int64_t c = 0; c < classes; ++c) {
    for (int64_t j = 0; j < n; ++j) invalid += LabelIsValid(z[c * kWidth + j]) ? 0 : 1;
  }
  return invalid;
}

template <typename LogitT, typename LabelT, bool kSparse, bool kFocal>
std::string SoftmaxStatsImpl(const SeglossProblem& p, const ParallelFor& parallel_for,
                             float* stats) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  using Acc = typename Lanes<Compute, 1>::Vec;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const ProblemShape& s = p.shape;
  const int64_t classes = s.classes;
  const SoftmaxWorkPlan plan = MakeSoftmaxWorkPlan(s);
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  const bool weighted = p.weights != nullptr;
  std::vector<double> partials(plan.num_items * classes * kNumStats, 0.0);
  std::vector<ForwardCounts> item_counts(plan.num_items);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);

  auto run_items = [&](int64_t first, int64_t last) {
    ForwardScratch<Compute, Acc> b(classes, kSparse, weighted);
    for (int64_t index = first; index < last; ++index) {
      const SoftmaxItem item = SoftmaxItemAt(s, plan, index);
      ForwardCounts& counts = item_counts[index];
      double* partial = partials.data() + index * classes * kNumStats;
      auto fold = [&] {
        for (int64_t i = 0; i < classes * kNumStats; ++i) {
          partial[i] += SumLanes(b.acc[i]);
          b.acc[i] = Acc(0.0f);
        }
      };
      for (int64_t pos = item.begin; pos < item.end; pos += kWidth) {
        const int64_t n = std::min(kWidth, item.end - pos);
        const bool by_class = StageVector<kSparse>(p, strides, item.batch, pos, n, logits,
                                                   labels, b, &counts);
        if (p.check_numerics) {
          counts.nonfinite_logits += CountNonFinite(b.x.data(), classes * kWidth);
        }
        if (AccumulateVector<Compute, kSparse, kFocal>(classes, p.squared,
                                                       static_cast<Compute>(p.focal.gamma),
                                                       by_class, b)) {
          counts.invalid_labels += CountInvalidStagedLabels(b.z.data(), classes, n);
        }
        if ((pos + kWidth - item.begin) % kFoldPositions == 0) fold();
      }
      fold();
    }
  };
  parallel_for(plan.num_items, plan.positions_per_item * classes * 8, run_items);

  ForwardCounts total;
  for (const ForwardCounts& c : item_counts) total.Add(c);
  const std::string error = ForwardCountsMessage(p, total);
  if (!error.empty()) return error;

  // Item partials in item order (fixed), then one rounding to float32.
  std::vector<double> sums(s.batch * classes * kNumStats, 0.0);
  for (int64_t index = 0; index < plan.num_items; ++index) {
    const SoftmaxItem item = SoftmaxItemAt(s, plan, index);
    const double* partial = partials.data() + index * classes * kNumStats;
    double* dst = sums.data() + item.batch * classes * kNumStats;
    for (int64_t i = 0; i < classes * kNumStats; ++i) dst[i] += partial[i];
  }
  for (size_t i = 0; i < sums.size(); ++i) stats[i] = static_cast<float>(sums[i]);
  return "";
}

}  // namespace

template <typename LogitT, typename LabelT, bool kSparse>
std::string SoftmaxStatsForTypes(const SeglossProblem& p, const ParallelFor& parallel_for,
                                 float* stats) {
  // gamma = 0 takes the plain instantiation: its results never depend on the focal code.
  if (p.focal.gamma > 0.0f) {
    return SoftmaxStatsImpl<LogitT, LabelT, kSparse, true>(p, parallel_for, stats);
  }
  return SoftmaxStatsImpl<LogitT, LabelT, kSparse, false>(p, parallel_for, stats);
}

#define FSL_INSTANTIATE_SOFTMAX_STATS(LabelT, LogitT, sparse)                                 \
  template std::string SoftmaxStatsForTypes<LogitT, LabelT, sparse>(const SeglossProblem&,   \
                                                                     const ParallelFor&,     \
                                                                     float*);
#define FSL_INSTANTIATE_SOFTMAX_STATS_DENSE(LabelT, LogitT) \
  FSL_INSTANTIATE_SOFTMAX_STATS(LabelT, LogitT, false)
#define FSL_INSTANTIATE_SOFTMAX_STATS_SPARSE(IdT, LogitT) \
  FSL_INSTANTIATE_SOFTMAX_STATS(IdT, LogitT, true)
#define FSL_INSTANTIATE_SOFTMAX_STATS_FOR_LOGITS(LogitT, unused)           \
  FSL_FOR_EACH_LABEL_TYPE(FSL_INSTANTIATE_SOFTMAX_STATS_DENSE, LogitT)    \
  FSL_FOR_EACH_CLASS_ID_TYPE(FSL_INSTANTIATE_SOFTMAX_STATS_SPARSE, LogitT)
FSL_FOR_EACH_LOGIT_TYPE(FSL_INSTANTIATE_SOFTMAX_STATS_FOR_LOGITS, unused)
#undef FSL_INSTANTIATE_SOFTMAX_STATS_FOR_LOGITS
#undef FSL_INSTANTIATE_SOFTMAX_STATS_SPARSE
#undef FSL_INSTANTIATE_SOFTMAX_STATS_DENSE
#undef FSL_INSTANTIATE_SOFTMAX_STATS

}  // namespace cpu
}  // namespace fused_segloss
