// CPU gradient pass: dL/dlogits for one (logits, labels) storage-type pair (instantiated
// for every pair at the end of this file).
//
// Operands: SeglossProblem (segloss_cpu.h) and grad_stats = dL/dstats, float32 [B, C, 8].
// Output: the logits' shape and dtype. Element (b, n, c) gets LogitGradientGivenExp of
// segloss_math.h with the upstream gradients of its (b, c) row's three differentiable
// columns (ce_sum, intersection, pred_sum): w·(g_ce·ce' + g_inter·z·p(1-p) +
// g_pred·k·p^(k-1)·p(1-p)), computed in the compute type and rounded once to the logits'
// dtype. Each element is written exactly once, in the same partition as the forward
// (segloss_cpu_blocks.h); writing in place over the logits is fine, because every vector
// is loaded before the same positions are stored.
#include <algorithm>
#include <vector>

#include "segloss_cpu_blocks.h"

namespace fused_segloss {
namespace cpu {
namespace {

// The 4 per-lane gradient coefficients of one vector of a row: pos_weight, g_ce, g_inter,
// g_pred (the rows of the [4][padded] pattern that GradImpl fills per item).
template <typename Vec>
struct GradientPattern {
  Vec pos_weight, g_ce, g_inter, g_pred;
};

template <typename Vec, typename Compute>
FSL_HD GradientPattern<Vec> LoadPattern(const Compute* pattern_lanes, int64_t padded,
                                        int64_t lane0) {
  return {Load<Vec>(pattern_lanes + lane0), Load<Vec>(pattern_lanes + padded + lane0),
          Load<Vec>(pattern_lanes + 2 * padded + lane0),
          Load<Vec>(pattern_lanes + 3 * padded + lane0)};
}

// Gradient of one vector of a row. `exp_ahead`, when given, is ExpOfNegativeAbs of this
// vector's logits, computed earlier (the pipeline in GradientBlock).
template <typename Vec, bool kSquared, bool kWeighted, bool kPartial, typename LogitT,
          typename LabelT, typename Focal>
FSL_HD void GradientElements(const LogitT* x, const LabelT* z, const float* w,
                             const GradientPattern<Vec>& pattern, Focal focal, int lanes,
                             LogitT* out, const Vec* exp_ahead = nullptr) {
  const ElementInputs<Vec> in = LoadInputs<Vec, kWeighted, kPartial>(x, z, w, lanes);
  const Vec e = exp_ahead ? *exp_ahead : ExpOfNegativeAbs(in.x);
  const Vec g = LogitGradientGivenExp<Vec, kSquared, Focal>(
      in.x, e, in.z, in.w, pattern.pos_weight, pattern.g_ce, pattern.g_inter, pattern.g_pred,
      focal);
  if constexpr (kPartial) {
    StorePartial(g, out, lanes);
  } else {
    StoreVec(g, out);
  }
}

// Row ends only: kept out of line, so that each kernel instantiation holds one inlined copy
// of the per-element math for full vectors. It loads its own pattern: passing the full
// vectors' pattern by address would force the compiler to keep that pattern on the stack.
template <typename Vec, bool kSquared, bool kWeighted, typename Compute, typename LogitT,
          typename LabelT, typename Focal>
__attribute__((noinline)) void PartialGradientElements(const LogitT* x, const LabelT* z,
                                                       const float* w,
                                                       const Compute* pattern_lanes,
                                                       int64_t padded, int64_t lane0,
                                                       Focal focal, int lanes, LogitT* out) {
  GradientElements<Vec, kSquared, kWeighted, true>(
      x, z, w, LoadPattern<Vec>(pattern_lanes, padded, lane0), focal, lanes, out);
}

// The gradient of one block (whole rows; the last may be short), rows in memory order.
template <typename Compute, bool kSquared, bool kWeighted, bool kFocal, typename LogitT,
          typename LabelT>
void GradientBlock(const LogitT* x, const LabelT* z, const float* w, int64_t count,
                   const RowGeometry& g, const Compute* pattern_lanes,
                   const FocalOptions& focal_options, LogitT* out) {
  using Vec = typename Lanes<Compute, kGradientParts>::Vec;
  const auto focal = FocalFor<Vec, kFocal>(focal_options);
  constexpr int kWidth = Lanes<Compute, kGradientParts>::kWidth;
  const int64_t full_vectors = g.period / kWidth;
  const int tail_lanes = static_cast<int>(g.period % kWidth);
  const int64_t full_rows = count / g.period;
  // The full rows, software-pipelined like the forward's AccumulateBlock: the next full
  // vector's exp is issued before this vector's gradient, so that two independent
  // dependency chains are in flight (the same values bit for bit). In place stays safe:
  // the logits read ahead lie past every element written so far.
  const int64_t vectors = full_rows * full_vectors;
  Vec next_exp = vectors > 0 ? ExpOfNegativeAbs(Load<Vec>(x)) : Vec(0.0f);
  for (int64_t k = 0, i = 0, v = 0; k < vectors; ++k) {
    const Vec exp_ahead = next_exp;
    const bool row_ends = v + 1 == full_vectors;
    const int64_t step = row_ends ? kWidth + tail_lanes : kWidth;  // to the next full vector
    next_exp = ExpOfNegativeAbs(Load<Vec>(x + (k + 1 < vectors ? i + step : i)));
    PrefetchInputs<kWidth, kWeighted>(x + i, z + i, WeightsAt<kWeighted>(w, i));
    PrefetchAhead<kWidth>(out + i, /*for_write=*/true);
    GradientElements<Vec, kSquared, kWeighted, false>(
        x + i, z + i, WeightsAt<kWeighted>(w, i),
        LoadPattern<Vec>(pattern_lanes, g.padded, v * kWidth), focal, kWidth, out + i,
        &exp_ahead);
    if (row_ends) {
      if (tail_lanes > 0) {
        PartialGradientElements<Vec, kSquared, kWeighted>(
            x + i + kWidth, z + i + kWidth, WeightsAt<kWeighted>(w, i + kWidth), pattern_lanes,
            g.padded, full_vectors * kWidth, focal, tail_lanes, out + i + kWidth);
      }
      v = 0;
    } else {
      ++v;
    }
    i += step;
  }
  // The block's last, shorter row (and every row when a row is narrower than one vector).
  for (int64_t row = full_vectors > 0 ? full_rows * g.period : 0; row < count; row += g.period) {
    const int64_t row_count = std::min(g.period, count - row);
    for (int64_t v = 0; v < g.vectors; ++v) {
      const int64_t lane0 = v * kWidth;
      if (lane0 >= row_count) break;
      const int64_t i = row + lane0;
      if (lane0 + kWidth <= row_count) {
        PrefetchInputs<kWidth, kWeighted>(x + i, z + i, WeightsAt<kWeighted>(w, i));
        PrefetchAhead<kWidth>(out + i, /*for_write=*/true);
        GradientElements<Vec, kSquared, kWeighted, false>(
            x + i, z + i, WeightsAt<kWeighted>(w, i),
            LoadPattern<Vec>(pattern_lanes, g.padded, lane0), focal, kWidth, out + i);
      } else {
        PartialGradientElements<Vec, kSquared, kWeighted>(
            x + i, z + i, WeightsAt<kWeighted>(w, i), pattern_lanes, g.padded, lane0, focal,
            static_cast<int>(row_count - lane0), out + i);
      }
    }
  }
}

template <typename LogitT, typename LabelT, bool kSquared, bool kWeighted, bool kFocal>
std::string GradImpl(const SeglossProblem& p, const float* grad_stats,
                     const ParallelFor& parallel_for, void* grad_out) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  const ProblemShape& s = p.shape;
  const StatsWorkPlan plan = MakeStatsWorkPlan(s);
  const RowGeometry geo = MakeRowGeometry<Compute, kGradientParts>(s);
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  auto* out = static_cast<LogitT*>(grad_out);

  auto run_items = [&](int64_t first, int64_t last) {
    const int64_t block = geo.block_rows * geo.period;
    std::vector<float> w_buf(kWeighted ? block : 0);
    // [4][padded]: pos_weight, g_ce, g_inter, g_pred per lane (padding lanes 0).
    std::vector<Compute> pattern(4 * geo.padded, Compute(0));
    for (int64_t index = first; index < last; ++index) {
      const Item item = ItemAt(s, plan, index);
      const ItemSpan span = SpanOf(s, item);
      ForEachLaneClass(s, item, geo.period, [&](int64_t j, int64_t c) {
        const float* upstream = grad_stats + (item.batch * s.classes + c) * kNumStats;
        pattern[j] = p.pos_weight ? Compute(p.pos_weight[c]) : Compute(1);
        pattern[geo.padded + j] = upstream[kCeSum];
        pattern[2 * geo.padded + j] = upstream[kIntersection];
        pattern[3 * geo.padded + j] = upstream[kPredSum];
      });
      for (int64_t offset = 0; offset < span.count; offset += block) {
        const int64_t n = std::min(block, span.count - offset);
        const float* w = nullptr;
        if constexpr (kWeighted) {
          w = BlockWeights(p, strides, item, offset, n, w_buf.data(), /*invalid=*/nullptr);
        }
        const int64_t at = span.base + offset;
        GradientBlock<Compute, kSquared, kWeighted, kFocal>(logits + at, labels + at, w, n,
                                                            geo, pattern.data(), p.focal,
                                                            out + at);
      }
    }
  };
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 2, run_items);
  return "";
}

}  // namespace

template <typename LogitT, typename LabelT>
std::string LogitGradForTypes(const SeglossProblem& p, const float* grad_stats,
                              const ParallelFor& parallel_for, void* grad_out) {
  // The focal variant is an instantiation of its own: the plain one stays as it was.
  return WithVariant(p, [&](auto squared, auto weighted) {
    if (FocalEnabled(p.focal)) {
      return GradImpl<LogitT, LabelT, squared.value, weighted.value, true>(
          p, grad_stats, parallel_for, grad_out);
    }
    return GradImpl<LogitT, LabelT, squared.value, weighted.value, false>(
        p, grad_stats, parallel_for, grad_out);
  });
}

#define FSL_INSTANTIATE_GRAD(LabelT, LogitT)                                              \
  template std::string LogitGradForTypes<LogitT, LabelT>(const SeglossProblem&,           \
                                                         const float*, const ParallelFor&, \
                                                         void*);
#define FSL_INSTANTIATE_GRAD_FOR_LOGITS(LogitT, unused) \
  FSL_FOR_EACH_LABEL_TYPE(FSL_INSTANTIATE_GRAD, LogitT)
FSL_FOR_EACH_LOGIT_TYPE(FSL_INSTANTIATE_GRAD_FOR_LOGITS, unused)
#undef FSL_INSTANTIATE_GRAD_FOR_LOGITS
#undef FSL_INSTANTIATE_GRAD

}  // namespace cpu
}  // namespace fused_segloss
