// CPU gradient pass of softmax mode: dL/dlogits for one (logits, labels) storage-type pair,
// dense labels or sparse class ids (instantiated for every pair at the end of this file).
//
// Operands: SeglossProblem (segloss_cpu.h), activation = softmax, and grad_stats =
// dL/dstats, float32 [B, C, 8]. Output: the logits' shape and dtype. With g_ce, g_inter,
// g_pred the upstream gradients of class c's ce_sum, intersection and pred_sum in image b,
// every pixel gets (segloss_softmax_math.h)
//   dL/dx_j = u_j - p_j·Σ_c u_c,   u_c = SoftmaxGradientTerm(p_c, -log p_c, z_c, w_c, ...)
// computed in the compute type and rounded once to the logits' dtype.
//
// One pass, per vector of positions staged [C][kWidth] (segloss_cpu_softmax.h): the
// normaliser, keeping exp(x - m); every u_c and p_c into buffers while Σ_c u_c is summed in
// class order; then every dx_j. Each element is written exactly once, and every vector is
// staged before its positions are written, so the output may be the logits' own buffer.
// The inputs are trusted (a forward pass over them came first), except that an invalid
// class id is never used to index anything: its pixel is treated as ignored.
#include <algorithm>
#include <vector>

#include "segloss_cpu_softmax.h"

namespace fused_segloss {
namespace cpu {
namespace {

// The staged vector, u ([C][kWidth]) and the item's upstream gradients ([3][C]: g_ce,
// g_inter, g_pred of the item's image).
template <typename Compute>
struct GradScratch : StagedVector<Compute> {
  GradScratch(int64_t classes, bool sparse, bool weighted)
      : StagedVector<Compute>(classes, sparse, weighted),
        u(classes * kSoftmaxWidth<Compute>),
        upstream(3 * classes) {}
  std::vector<Compute> u;
  std::vector<Compute> upstream;
};

// The gradient of one staged vector, into b.x ([C][kWidth], the compute type).
template <typename Compute, bool kSparse, bool kFocal>
void GradientVector(int64_t classes, bool squared, Compute gamma_value, bool by_class,
                    GradScratch<Compute>& b) {
  using Vec = SoftmaxVec<Compute>;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  Compute* x = b.x.data();
  Compute* e = b.e.data();
  Compute* u = b.u.data();
  const SoftmaxPixel<Vec> px = NormaliseStaged<Vec>(classes, b);
  const Vec keep = Load<Vec>(b.keep.data());
  const Vec ids = kSparse ? Load<Vec>(b.z.data()) : Vec(0.0f);
  const Vec gamma(gamma_value);
  const Compute* g_ce = b.upstream.data();
  const Compute* g_inter = g_ce + classes;
  const Compute* g_pred = g_inter + classes;
  Vec u_sum(0.0f);
  for (int64_t c = 0; c < classes; ++c) {
    const SoftmaxClass<Vec> cls =
        SoftmaxClassGivenExp(Load<Vec>(x + c * kWidth), Load<Vec>(e + c * kWidth), px);
    const Vec z = StagedLabel<kSparse>(b, ids, c);
    const Vec w = StagedWeight(b, keep, by_class, c);
    const Vec u_c = SoftmaxGradientTerm(cls, z, w, Vec(g_ce[c]), Vec(g_inter[c]),
                                        Vec(g_pred[c]), squared, kFocal, gamma);
    StoreVec(u_c, u + c * kWidth);
    StoreVec(cls.p, e + c * kWidth);
    u_sum += u_c;
  }
  for (int64_t c = 0; c < classes; ++c) {
    StoreVec(SoftmaxLogitGradient(Load<Vec>(u + c * kWidth), Load<Vec>(e + c * kWidth), u_sum),
             x + c * kWidth);
  }
}

// The staged gradient (n live positions) to the output, in the logits' dtype.
template <typename Compute, typename LogitT>
void WriteGradient(const ProblemShape& s, const Compute* grad, int64_t n,
                   PixelTranspose<Compute>& transpose, LogitT* out) {
  using Vec = SoftmaxVec<Compute>;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  if (s.channels_last) {
    transpose.Out(grad, n, out);
    return;
  }
  for (int64_t c = 0; c < s.classes; ++c) {
    const Vec g = Load<Vec>(grad + c * kWidth);
    if (n == kWidth) {
      StoreVec(g, out + c * s.positions);
    } else {
      StorePartial(g, out + c * s.positions, static_cast<int>(n));
    }
  }
}

template <typename LogitT, typename LabelT, bool kSparse, bool kFocal>
std::string SoftmaxGradImpl(const SeglossProblem& p, const float* grad_stats,
                            const ParallelFor& parallel_for, void* grad_out) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const ProblemShape& s = p.shape;
  const int64_t classes = s.classes;
  const SoftmaxWorkPlan plan = MakeSoftmaxWorkPlan(s);
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  const bool weighted = p.weights != nullptr;
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  auto* out = static_cast<LogitT*>(grad_out);

  auto run_items = [&](int64_t first, int64_t last) {
    GradScratch<Compute> b(classes, kSparse, weighted);
    for (int64_t index = first; index < last; ++index) {
      const SoftmaxItem item = SoftmaxItemAt(s, plan, index);
      for (int64_t c = 0; c < classes; ++c) {
        const float* g = grad_stats + (item.batch * classes + c) * kNumStats;
        b.upstream[c] = g[kCeSum];
        b.upstream[classes + c] = g[kIntersection];
        b.upstream[2 * classes + c] = g[kPredSum];
      }
      for (int64_t pos = item.begin; pos < item.end; pos += kWidth) {
        const int64_t n = std::min(kWidth, item.end - pos);
        const bool by_class = StageVector<kSparse>(p, strides, item.batch, pos, n, logits,
                                                   labels, b, /*counts=*/nullptr);
        GradientVector<Compute, kSparse, kFocal>(
            classes, p.squared, static_cast<Compute>(p.focal.gamma), by_class, b);
        WriteGradient(s, b.x.data(), n, b.transpose,
                      out + ElementIndex(s, item.batch, pos, 0));
      }
    }
  };
  parallel_for(plan.num_items, plan.positions_per_item * classes * 8, run_items);
  return "";
}

}  // namespace

template <typename LogitT, typename LabelT, bool kSparse>
std::string SoftmaxLogitGradForTypes(const SeglossProblem& p, const float* grad_stats,
                                     const ParallelFor& parallel_for, void* grad_out) {
  // gamma = 0 takes the plain instantiation: its results never depend on the focal code.
  if (p.focal.gamma > 0.0f) {
    return SoftmaxGradImpl<LogitT, LabelT, kSparse, true>(p, grad_stats, parallel_for,
                                                          grad_out);
  }
  return SoftmaxGradImpl<LogitT, LabelT, kSparse, false>(p, grad_stats, parallel_for,
                                                         grad_out);
}

#define FSL_INSTANTIATE_SOFTMAX_GRAD(LabelT, LogitT, sparse)                              \
  template std::string SoftmaxLogitGradForTypes<LogitT, LabelT, sparse>(                 \
      const SeglossProblem&, const float*, const ParallelFor&, void*);
#define FSL_INSTANTIATE_SOFTMAX_GRAD_DENSE(LabelT, LogitT) \
  FSL_INSTANTIATE_SOFTMAX_GRAD(LabelT, LogitT, false)
#define FSL_INSTANTIATE_SOFTMAX_GRAD_SPARSE(IdT, LogitT) \
  FSL_INSTANTIATE_SOFTMAX_GRAD(IdT, LogitT, true)
#define FSL_INSTANTIATE_SOFTMAX_GRAD_FOR_LOGITS(LogitT, unused)           \
  FSL_FOR_EACH_LABEL_TYPE(FSL_INSTANTIATE_SOFTMAX_GRAD_DENSE, LogitT)    \
  FSL_FOR_EACH_CLASS_ID_TYPE(FSL_INSTANTIATE_SOFTMAX_GRAD_SPARSE, LogitT)
FSL_FOR_EACH_LOGIT_TYPE(FSL_INSTANTIATE_SOFTMAX_GRAD_FOR_LOGITS, unused)
#undef FSL_INSTANTIATE_SOFTMAX_GRAD_FOR_LOGITS
#undef FSL_INSTANTIATE_SOFTMAX_GRAD_SPARSE
#undef FSL_INSTANTIATE_SOFTMAX_GRAD_DENSE
#undef FSL_INSTANTIATE_SOFTMAX_GRAD

}  // namespace cpu
}  // namespace fused_segloss
