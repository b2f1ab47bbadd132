// The per-thread work of the softmax-mode CUDA kernels (activation = softmax: one class
// per pixel), as __host__ __device__ functions, so that csrc/python/cuda_simulation.cc
// runs the very same code on the host for every (block, thread) of a launch.
//
// Operands: a LaunchPlan from MakeSoftmaxLaunchPlan and a KernelProblem
// (segloss_cuda_plan.h); labels dense (the logits' shape, any FSL_FOR_EACH_LABEL_TYPE) or
// sparse class ids [B, N] (kSparse: uint8, int32 or int64); grad_stats = dL/dstats
// [B, C, 8] for the gradient. The per-pixel math is segloss_softmax_math.h's
// (SoftmaxNormalise, SoftmaxClassParts, SoftmaxForwardTerms, SoftmaxGradientTerm,
// SoftmaxLogitGradient), in the compute type (float, or double for float64 logits).
//
// Partition: one thread per pixel. A block covers threads·kSoftmaxPixelsPerThread
// positions of one image; thread t owns positions start + i·threads + t, so that for
// channels_first (class stride N) the threads of a warp read neighbouring addresses; for
// channels_last each thread reads its pixel's C contiguous values (served by L1/L2, as
// every line is read again by the later class rounds).
//
// Forward: each thread first computes its pixels' normalisers (max, argmax, log s, 1/s:
// one pass over the C logits, kept in registers) and checks their class ids. The block
// then walks the classes in rounds of kSlots = 4: every thread adds its pixels' eight
// terms of those 4 classes into acc[4][8], and the block sums acc over threads with the
// sigmoid kernels' shared-memory tree (StoreLanes / TreeStep with period 1), whose first
// 32 sums are the block's partial records of the round's classes. Shared memory is
// therefore 32·threads compute values (32 KiB) for any C, and the block reduction is
// the same fixed-order tree as in sigmoid mode: per-(image, class) sums are
// deterministic (fixed per-block float64 records, combined in chunk order by
// CombineStat; no floating-point atomics). The price is ceil(C / 4) tree reductions per
// block, each of 1 + log2(threads) barriers, amortised over the block's
// kSoftmaxPixelsPerThread·threads pixels (3 per thread: as many as fit next to acc in the
// 128 registers ptxas gives these kernels for sm_75 to sm_90 without spilling).
//
// Gradient: per pixel, the normaliser again, then U = Σ_c u_c in a second pass and
// dx_j = u_j - p_j·U in a third (u_j recomputed: no per-class storage), written in the
// logits' dtype. No reduction, no shared memory.
//
// Invalid sparse ids (outside [0, C) and not ignore_index) count as ignored pixels (never
// an out-of-bounds read) and are counted with their min and max (ClassIdCounts); dense
// labels and weights are counted per element like the sigmoid kernels (ValueCounts).
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "segloss_cuda_plan.h"
#include "segloss_cuda_thread.h"
#include "segloss_math.h"

namespace fused_segloss {
namespace cuda {

// The pixels of one thread in a softmax block, and what the class rounds need of them
// (kept lean: it lives in registers through every round, next to acc[4][8]). Pixel i is
// at position first + i·threads; positions at or past N are absent.
template <typename Compute>
struct SoftmaxThreadPixels {
  int64_t batch = 0;
  int64_t first = 0;
  // Sparse: the pixel's class id, or -1 when the pixel is ignored or its id invalid
  // (weight 0 for every class; C < 2^31 always). Dense: 0 (unused).
  int32_t label[kSoftmaxPixelsPerThread];
  SoftmaxPixel<Compute> px[kSoftmaxPixelsPerThread];
};

// Block b's image and first position.
FSL_HD int64_t SoftmaxBlockBatch(const LaunchPlan& plan, int64_t block) {
  return block / plan.chunks_per_row;
}
FSL_HD int64_t SoftmaxPixelPosition(const LaunchPlan& plan, int64_t block, int thread, int i) {
  return (block % plan.chunks_per_row) * plan.chunk_length +
         static_cast<int64_t>(i) * plan.threads + thread;
}

// Flat index of (b, n, class 0) and the stride between classes.
FSL_HD int64_t SoftmaxPixelBase(const ProblemShape& s, int64_t b, int64_t n) {
  return ElementIndex(s, b, n, 0);
}
FSL_HD int64_t SoftmaxClassStride(const ProblemShape& s) {
  return s.channels_last ? 1 : s.positions;
}

// The class id of sparse pixel (b, n) as used by the kernels: -1 when it is ignore_index
// (which may be a class id too), the id when it lies in [0, C), else -1 as well (invalid:
// counted in `ids` when ids is not null).
template <typename IdT>
FSL_HD int64_t SoftmaxClassId(const KernelProblem& p, int64_t b, int64_t n, ClassIdCounts* ids) {
  const auto* labels = static_cast<const IdT*>(p.labels);
  const int64_t id = static_cast<int64_t>(labels[b * p.shape.positions + n]);
  if (p.has_ignore_index && id == p.ignore_index) return -1;  // even when it is a class
  if (id >= 0 && id < p.shape.classes) return id;
  if (ids != nullptr) {
    ids->min = ids->count == 0 || id < ids->min ? id : ids->min;
    ids->max = ids->count == 0 || id > ids->max ? id : ids->max;
    ids->count += 1;
  }
  return -1;
}

template <typename LogitT, typename Compute>
FSL_HD SoftmaxPixel<Compute> SoftmaxPixelOf(const KernelProblem& p, int64_t base) {
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const int64_t stride = SoftmaxClassStride(p.shape);
  return SoftmaxNormalise<Compute>(
      p.shape.classes, [&](int64_t c) { return Load<Compute>(logits, base + c * stride); });
}

// One class of one pixel: its label, its weight (0 for an ignored or invalid sparse
// pixel, whatever the weights hold), and the counts of invalid dense labels and weights.
template <typename LabelT, bool kSparse, typename Compute>
FSL_HD void SoftmaxClassInputs(const KernelProblem& p, int64_t b, int64_t n, int64_t c,
                               int64_t element, int64_t label, Compute& z, Compute& w,
                               ValueCounts* counts) {
  float wf = 1.0f;
  if (p.weights) {
    wf = p.weights[WeightIndex(p.strides, b, n, c)];
    if (counts) counts->weights += WeightIsValid(wf) ? 0 : 1;
  }
  if constexpr (kSparse) {
    z = label == c ? Compute(1) : Compute(0);
    w = label >= 0 ? static_cast<Compute>(wf) : Compute(0);
  } else {
    z = Load<Compute>(static_cast<const LabelT*>(p.labels), element);
    if (counts) counts->labels += LabelIsValid(z) ? 0 : 1;
    w = static_cast<Compute>(wf);
  }
}

// ---------------------------------------------------------------------------------
// Forward, step 1: the thread's pixels (normalisers, class ids).
template <typename LogitT, typename LabelT, bool kSparse,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void SoftmaxPixelsThread(const LaunchPlan& plan, const KernelProblem& p, int64_t block,
                                int thread, SoftmaxThreadPixels<Compute>& pixels,
                                ClassIdCounts& ids) {
  pixels.batch = SoftmaxBlockBatch(plan, block);
  pixels.first = SoftmaxPixelPosition(plan, block, thread, 0);
  FSL_UNROLL
  for (int i = 0; i < kSoftmaxPixelsPerThread; ++i) {
    const int64_t n = pixels.first + static_cast<int64_t>(i) * plan.threads;
    pixels.label[i] = 0;
    pixels.px[i] = SoftmaxPixel<Compute>{Compute(0), Compute(0), Compute(0), Compute(0)};
    if (n >= p.shape.positions) continue;
    if constexpr (kSparse) {
      pixels.label[i] = static_cast<int32_t>(SoftmaxClassId<LabelT>(p, pixels.batch, n, &ids));
    }
    pixels.px[i] = SoftmaxPixelOf<LogitT, Compute>(p, SoftmaxPixelBase(p.shape, pixels.batch, n));
  }
}

// Forward, step 2 (once per class round `tile`): the thread's sums of its pixels' terms
// of classes tile·kSlots + j, j < kSlots, in acc[j] (0 for classes past C).
template <typename LogitT, typename LabelT, bool kSparse,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void SoftmaxTileThread(const LaunchPlan& plan, const KernelProblem& p,
                              const SoftmaxThreadPixels<Compute>& pixels, int64_t tile,
                              Compute acc[kSlots][kNumStats], ValueCounts& counts) {
  const ProblemShape& s = p.shape;
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const bool focal = p.focal.gamma > 0.0f;  // uniform: the plain branch for gamma = 0
  const Compute gamma = static_cast<Compute>(p.focal.gamma);
  const int64_t stride = SoftmaxClassStride(s);
  FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) {
    for (int k = 0; k < kNumStats; ++k) acc[j][k] = Compute(0);
  }
  FSL_UNROLL
  for (int i = 0; i < kSoftmaxPixelsPerThread; ++i) {
    const int64_t n = pixels.first + static_cast<int64_t>(i) * plan.threads;
    if (n >= s.positions) continue;
    const int64_t base = SoftmaxPixelBase(s, pixels.batch, n);
    FSL_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      const int64_t c = tile * kSlots + j;
      if (c >= s.classes) continue;
      const int64_t element = base + c * stride;
      Compute z, w;
      SoftmaxClassInputs<LabelT, kSparse>(p, pixels.batch, n, c, element, pixels.label[i], z,
                                          w, &counts);
      Compute t[kNumStats];
      SoftmaxForwardTerms(SoftmaxClassParts(Load<Compute>(logits, element), pixels.px[i]), z,
                          w, static_cast<Compute>(static_cast<float>(c)), pixels.px[i],
                          p.squared, focal, gamma, t);
      FSL_UNROLL
      for (int k = 0; k < kNumStats; ++k) acc[j][k] += t[k];
    }
  }
}

// Forward, step 3, after the block reduction left the round's sums in
// lane_sums[(j·8 + column)·stride + 0]: value `index` = j·8 + column of the block's
// records of classes tile·kSlots + j (threads index them 0 .. 31).
template <typename Compute>
FSL_HD void WriteSoftmaxPartial(const LaunchPlan& plan, const ProblemShape& s, int64_t block,
                                int64_t tile, const Compute* lane_sums, int stride, int index,
                                double* partials) {
  const int j = index / kNumStats;
  const int column = index % kNumStats;
  const int64_t c = tile * kSlots + j;
  if (c >= s.classes) return;
  const int64_t record = PartialIndex(plan, s, SoftmaxBlockBatch(plan, block), c,
                                      block % plan.chunks_per_row);
  partials[record * kNumStats + column] =
      static_cast<double>(lane_sums[(j * kNumStats + column) * stride]);
}

constexpr int kSoftmaxRecordValues = kSlots * kNumStats;  // values written per round

// ---------------------------------------------------------------------------------
// Gradient: u_c and p_c of class c of one pixel.
template <typename LabelT, bool kSparse, typename Compute>
FSL_HD Compute SoftmaxElementTerm(const KernelProblem& p, const float* grad_stats,
                                  const SoftmaxPixel<Compute>& px, Compute x, int64_t b,
                                  int64_t n, int64_t c, int64_t element, int64_t label,
                                  bool focal, Compute gamma, Compute& prob) {
  Compute z, w;
  SoftmaxClassInputs<LabelT, kSparse>(p, b, n, c, element, label, z, w, nullptr);
  const float* g = grad_stats + (b * p.shape.classes + c) * kNumStats;
  const SoftmaxClass<Compute> cls = SoftmaxClassParts(x, px);
  prob = cls.p;
  return SoftmaxGradientTerm(cls, z, w, static_cast<Compute>(g[kCeSum]),
                             static_cast<Compute>(g[kIntersection]),
                             static_cast<Compute>(g[kPredSum]), p.squared, focal, gamma);
}

// The gradient of the thread's pixels, every class.
template <typename LogitT, typename LabelT, bool kSparse,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void SoftmaxGradThread(const LaunchPlan& plan, const KernelProblem& p,
                              const float* grad_stats, int64_t block, int thread, LogitT* out) {
  const ProblemShape& s = p.shape;
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const bool focal = p.focal.gamma > 0.0f;
  const Compute gamma = static_cast<Compute>(p.focal.gamma);
  const int64_t stride = SoftmaxClassStride(s);
  const int64_t b = SoftmaxBlockBatch(plan, block);
  for (int i = 0; i < kSoftmaxPixelsPerThread; ++i) {
    const int64_t n = SoftmaxPixelPosition(plan, block, thread, i);
    if (n >= s.positions) break;  // positions grow with i
    int64_t label = 0;
    if constexpr (kSparse) label = SoftmaxClassId<LabelT>(p, b, n, nullptr);
    const int64_t base = SoftmaxPixelBase(s, b, n);
    const SoftmaxPixel<Compute> px = SoftmaxPixelOf<LogitT, Compute>(p, base);
    Compute u_sum = Compute(0);
    for (int64_t c = 0; c < s.classes; ++c) {
      const int64_t e = base + c * stride;
      Compute prob;
      u_sum += SoftmaxElementTerm<LabelT, kSparse>(p, grad_stats, px, Load<Compute>(logits, e),
                                                   b, n, c, e, label, focal, gamma, prob);
    }
    for (int64_t c = 0; c < s.classes; ++c) {
      const int64_t e = base + c * stride;
      Compute prob;
      const Compute u = SoftmaxElementTerm<LabelT, kSparse>(
          p, grad_stats, px, Load<Compute>(logits, e), b, n, c, e, label, focal, gamma, prob);
      out[e] = FromCompute<LogitT>::Convert(SoftmaxLogitGradient(u, prob, u_sum));
    }
  }
}

}  // namespace cuda
}  // namespace fused_segloss
