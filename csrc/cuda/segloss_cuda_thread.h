// The per-thread work of the CUDA kernels, as __host__ __device__ functions: the group
// loads and stores, each thread's forward sums and its steps of the block reduction, the
// blocks' partial records and their combination, and each thread's gradient elements.
// (Sigmoid mode; softmax mode's per-thread work is segloss_cuda_softmax.h, which reuses
// the block reduction's steps and the second stage from here.)
//
// Operands: a LaunchPlan and a KernelProblem (segloss_cuda_plan.h: which elements a
// (block, thread) covers); grad_stats = dL/dstats [B, C, 8] for the gradient. The
// per-element math is segloss_math.h's (ForwardTerms, LogitGradient), the same templates
// as the CPU kernels', on scalars in the compute type (float, or double for float64).
//
// Everything a thread does except the barriers of the intra-block reduction lives here, so
// that csrc/python/cuda_simulation.cc can run the very same code on the host for every
// (block, thread) of a launch and check the result against the CPU kernel. The .cu files
// add only the __global__ wrappers and BlockReduceLanes (segloss_cuda_kernels.cuh).
#pragma once

#include <cstdint>
#include <cstring>

#include "dtypes.h"
#include "segloss_cuda_plan.h"
#include "segloss_math.h"

// Full unrolling of the per-slot loops on the device (nothing in host code, nvcc's host
// pass included).
#if defined(__CUDA_ARCH__)
#define FSL_UNROLL _Pragma("unroll")
#else
#define FSL_UNROLL
#endif

namespace fused_segloss {
namespace cuda {

// ---------------------------------------------------------------------------------
// Group loads and stores: 4 consecutive elements, one aligned vector access on the device.
template <typename T>
struct alignas(kSlots * sizeof(T)) Group {
  T v[kSlots];
};

#if !defined(__CUDA_ARCH__)
// Host simulation only: whole-group accesses at addresses the device could not load
// as one vector (which would fault there). The simulation fails when this is not 0.
inline int64_t& HostMisalignedGroupAccesses() {
  static thread_local int64_t count = 0;
  return count;
}
#endif

template <typename T>
FSL_HD void LoadGroup(const T* base, int64_t index, T out[kSlots]) {
#if defined(__CUDA_ARCH__)
  const Group<T> group = *reinterpret_cast<const Group<T>*>(base + index);
  FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) out[j] = group.v[j];
#else
  HostMisalignedGroupAccesses() += reinterpret_cast<uintptr_t>(base + index) % alignof(Group<T>) != 0;
  std::memcpy(out, base + index, sizeof(T) * kSlots);
#endif
}

template <typename T>
FSL_HD void StoreGroup(T* base, int64_t index, const T in[kSlots]) {
#if defined(__CUDA_ARCH__)
  // One vector store per 16 bytes (8 or 4 for narrow types), written as PTX: from a
  // plain struct store the compiler merges the two paths' stores into scalar ones.
  Group<T> group;
  FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) group.v[j] = in[j];
  constexpr int kBytes = static_cast<int>(sizeof(Group<T>));
  char* dst = reinterpret_cast<char*>(base + index);
  if constexpr (kBytes >= 16) {
    uint4 words[kBytes / 16];
    memcpy(words, &group, kBytes);
    FSL_UNROLL
    for (int k = 0; k < kBytes / 16; ++k) {
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst + 16 * k),
                   "r"(words[k].x), "r"(words[k].y), "r"(words[k].z), "r"(words[k].w)
                   : "memory");
    }
  } else if constexpr (kBytes == 8) {
    uint2 word;
    memcpy(&word, &group, kBytes);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(dst), "r"(word.x), "r"(word.y)
                 : "memory");
  } else {
    unsigned int word;
    memcpy(&word, &group, kBytes);
    asm volatile("st.global.b32 [%0], %1;" ::"l"(dst), "r"(word) : "memory");
  }
#else
  HostMisalignedGroupAccesses() += reinterpret_cast<uintptr_t>(base + index) % alignof(Group<T>) != 0;
  std::memcpy(base + index, in, sizeof(T) * kSlots);
#endif
}

template <typename Compute, typename T>
FSL_HD Compute Load(const T* base, int64_t index) {
  return static_cast<Compute>(ToCompute(base[index]));
}

// Loads one group of kSlots consecutive elements [group, group + kSlots) of the span
// [g.begin, g.end) into the compute type: a vector load when the whole group is inside
// and vector loads are allowed, else masked scalar loads (invalid slots read as 0).
// Returns whether the whole group was valid (shared by the forward and gradient threads).
template <typename LogitT, typename LabelT, typename Compute>
FSL_HD bool LoadSlots(const LogitT* logits, const LabelT* labels, bool vector_loads,
                      int64_t begin, int64_t end, int64_t group, Compute x[kSlots],
                      Compute z[kSlots], bool valid[kSlots]) {
  if (vector_loads && group >= begin && group + kSlots <= end) {
    LogitT xs[kSlots];
    LabelT zs[kSlots];
    LoadGroup(logits, group, xs);
    LoadGroup(labels, group, zs);
FSL_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      x[j] = static_cast<Compute>(ToCompute(xs[j]));
      z[j] = static_cast<Compute>(ToCompute(zs[j]));
      valid[j] = true;
    }
    return true;
  }
FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) {
    const int64_t e = group + j;
    valid[j] = e >= begin && e < end;
    x[j] = valid[j] ? Load<Compute>(logits, e) : Compute(0);
    z[j] = valid[j] ? Load<Compute>(labels, e) : Compute(0);
  }
  return false;
}

// One element's forward terms; the focal variant only where the problem asks for it (a
// branch every thread of the launch takes the same way), so the plain path is unchanged.
template <typename Compute, bool kSquared>
FSL_HD void ElementForwardTerms(const KernelProblem& p, Compute x, Compute z, Compute w,
                                Compute pos_weight, Compute t[kNumStats]) {
  if (FocalEnabled(p.focal)) {
    ForwardTerms<Compute, kSquared, Compute>(x, z, w, pos_weight, t, nullptr,
                                             MakeFocalParams<Compute>(p.focal));
  } else {
    ForwardTerms<Compute, kSquared>(x, z, w, pos_weight, t);
  }
}

// ---------------------------------------------------------------------------------
// Forward, span mode: one thread's accumulators, acc[slot][column].
template <typename LogitT, typename LabelT, bool kSquared,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void SpanStatsThread(const LaunchPlan& plan, const KernelProblem& p, int64_t block,
                            int thread, Compute acc[kSlots][kNumStats], ValueCounts& counts) {
  const SpanBlock g = SpanBlockOf(plan, p.shape, block);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  const int64_t first = SpanFirstElement(g, thread);
  const int64_t weight_step = SpanWeightStep(plan, p);
  int64_t weight_first[kSlots];
  Compute pos_weight[kSlots];
FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) {
    const SpanSlot slot = SpanSlotOf(p, g, thread, j);
    weight_first[j] = slot.weight_first;
    pos_weight[j] = p.pos_weight ? static_cast<Compute>(p.pos_weight[slot.klass]) : Compute(1);
    for (int k = 0; k < kNumStats; ++k) acc[j][k] = Compute(0);
  }
  for (int64_t trip = 0; trip < g.trips; ++trip) {
    const int64_t group = first + trip * plan.lanes;  // a multiple of 4
    Compute x[kSlots], z[kSlots], w[kSlots];
    bool valid[kSlots];
    LoadSlots(logits, labels, p.vector_loads, g.begin, g.end, group, x, z, valid);
FSL_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      if (!valid[j]) continue;
      float wf = 1.0f;
      if (p.weights) {
        wf = p.weights[weight_first[j] + trip * weight_step];
        counts.weights += WeightIsValid(wf) ? 0 : 1;
      }
      w[j] = static_cast<Compute>(wf);
      counts.labels += LabelIsValid(z[j]) ? 0 : 1;
      Compute t[kNumStats];
      ElementForwardTerms<Compute, kSquared>(p, x[j], z[j], w[j], pos_weight[j], t);
FSL_UNROLL
      for (int k = 0; k < kNumStats; ++k) acc[j][k] += t[k];
    }
  }
}

// The intra-block reduction's steps. The device runs StoreLanes in every thread, then
// for stride = threads/2, threads/4, ..., q a barrier and TreeStep in every thread
// (BlockReduceLanes in segloss_cuda_kernels.cuh); the host simulation runs the same
// steps thread by thread. Within one stride, threads read slots >= stride and write
// slots < stride, so the order of threads inside a step does not matter.
template <typename Compute>
FSL_HD void StoreLanes(const Compute acc[kSlots][kNumStats], int threads, int thread,
                       Compute* smem) {
  for (int j = 0; j < kSlots; ++j) {
    for (int k = 0; k < kNumStats; ++k) smem[(j * kNumStats + k) * threads + thread] = acc[j][k];
  }
}

template <typename Compute>
FSL_HD void TreeStep(int threads, int stride, int thread, Compute* smem) {
  if (thread >= stride) return;
  for (int v = 0; v < kSlots * kNumStats; ++v) {
    smem[v * threads + thread] += smem[v * threads + thread + stride];
  }
}

// The block's partial record for its `index`-th class (channels_last: class `index`;
// channels_first: the row's class, index 0), folded from the per-lane sums that the
// block reduction left in lane_sums[(slot·8 + column)·stride + thread], thread < q.
template <typename Compute>
FSL_HD void WriteSpanPartial(const LaunchPlan& plan, const ProblemShape& s, int64_t block,
                             const Compute* lane_sums, int stride, int64_t index,
                             double* partials) {
  const SpanBlock g = SpanBlockOf(plan, s, block);
  const int64_t lane_count = static_cast<int64_t>(kSlots) * plan.thread_period;
  int64_t klass, first_lane, lane_step;
  if (s.channels_last) {
    klass = index;
    first_lane = ((klass - g.origin) % s.classes + s.classes) % s.classes;
    lane_step = s.classes;
  } else {
    klass = g.klass;
    first_lane = 0;
    lane_step = 1;
  }
  double* record = partials + PartialIndex(plan, s, g.batch, klass, g.chunk) * kNumStats;
  for (int k = 0; k < kNumStats; ++k) {
    Compute sum = Compute(0);
    for (int64_t lane = first_lane; lane < lane_count; lane += lane_step) {
      sum += lane_sums[((lane % kSlots) * kNumStats + k) * stride + lane / kSlots];
    }
    record[k] = static_cast<double>(sum);
  }
}

// How many partial records a span block writes (threads index them 0 .. n-1).
FSL_HD int64_t SpanRecordsPerBlock(const ProblemShape& s) {
  return s.channels_last ? s.classes : 1;
}

// Forward, column mode: the thread's sums go to acc[0].
template <typename LogitT, typename LabelT, bool kSquared,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void ColumnStatsThread(const LaunchPlan& plan, const KernelProblem& p, int64_t block,
                              int thread, Compute acc[kSlots][kNumStats], ValueCounts& counts) {
  for (int j = 0; j < kSlots; ++j)
    for (int k = 0; k < kNumStats; ++k) acc[j][k] = Compute(0);
  const ColumnBlock g = ColumnBlockOf(plan, p.shape, block, thread);
  if (!g.active) return;
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  const Compute pos_weight = p.pos_weight ? static_cast<Compute>(p.pos_weight[g.klass]) : Compute(1);
  for (int64_t n = g.position_begin; n < g.position_end; ++n) {
    const int64_t e = ElementIndex(p.shape, g.batch, n, g.klass);
    const Compute x = Load<Compute>(logits, e);
    const Compute z = Load<Compute>(labels, e);
    float wf = 1.0f;
    if (p.weights) {
      wf = p.weights[WeightIndex(p.strides, g.batch, n, g.klass)];
      counts.weights += WeightIsValid(wf) ? 0 : 1;
    }
    counts.labels += LabelIsValid(z) ? 0 : 1;
    Compute t[kNumStats];
    ElementForwardTerms<Compute, kSquared>(p, x, z, static_cast<Compute>(wf), pos_weight, t);
    for (int k = 0; k < kNumStats; ++k) acc[0][k] += t[k];
  }
}

template <typename Compute>
FSL_HD void WriteColumnPartial(const LaunchPlan& plan, const ProblemShape& s, int64_t block,
                               int thread, const Compute acc[kSlots][kNumStats],
                               double* partials) {
  const ColumnBlock g = ColumnBlockOf(plan, s, block, thread);
  if (!g.active) return;
  double* record = partials + PartialIndex(plan, s, g.batch, g.klass, g.chunk) * kNumStats;
  for (int k = 0; k < kNumStats; ++k) record[k] = static_cast<double>(acc[0][k]);
}

// ---------------------------------------------------------------------------------
// Second stage: stats[b, c, column] = sum of the row's chunk records, in chunk order.
FSL_HD float CombineStat(const LaunchPlan& plan, const ProblemShape& s, const double* partials,
                         int64_t b, int64_t c, int column) {
  double sum = 0.0;
  for (int64_t chunk = 0; chunk < plan.chunks_per_row; ++chunk) {
    sum += partials[PartialIndex(plan, s, b, c, chunk) * kNumStats + column];
  }
  return static_cast<float>(sum);
}

// ---------------------------------------------------------------------------------
// Backward: the same partition; each element's gradient is written once.
template <typename Compute>
struct GradConstants {
  Compute pos_weight, g_ce, g_inter, g_pred;
  bool focal_enabled;
  FocalParams<Compute> focal;
};

template <typename Compute>
FSL_HD GradConstants<Compute> GradConstantsOf(const KernelProblem& p, const float* grad_stats,
                                              int64_t b, int64_t c) {
  const float* upstream = grad_stats + (b * p.shape.classes + c) * kNumStats;
  GradConstants<Compute> k;
  k.pos_weight = p.pos_weight ? static_cast<Compute>(p.pos_weight[c]) : Compute(1);
  k.g_ce = static_cast<Compute>(upstream[kCeSum]);
  k.g_inter = static_cast<Compute>(upstream[kIntersection]);
  k.g_pred = static_cast<Compute>(upstream[kPredSum]);
  k.focal_enabled = FocalEnabled(p.focal);
  k.focal = MakeFocalParams<Compute>(p.focal);
  return k;
}

// One element's gradient, converted to the logits' storage type.
template <typename LogitT, bool kSquared, typename Compute>
FSL_HD LogitT GradOfElement(const GradConstants<Compute>& k, Compute x, Compute z, float w) {
  if (k.focal_enabled) {  // the same for every thread of the launch
    return FromCompute<LogitT>::Convert(LogitGradient<Compute, kSquared>(
        x, z, static_cast<Compute>(w), k.pos_weight, k.g_ce, k.g_inter, k.g_pred, k.focal));
  }
  return FromCompute<LogitT>::Convert(LogitGradient<Compute, kSquared>(
      x, z, static_cast<Compute>(w), k.pos_weight, k.g_ce, k.g_inter, k.g_pred));
}

template <typename LogitT, typename LabelT, bool kSquared,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void SpanGradThread(const LaunchPlan& plan, const KernelProblem& p,
                           const float* grad_stats, int64_t block, int thread, LogitT* out) {
  const SpanBlock g = SpanBlockOf(plan, p.shape, block);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  const int64_t first = SpanFirstElement(g, thread);
  const int64_t weight_step = SpanWeightStep(plan, p);
  int64_t weight_first[kSlots];
  GradConstants<Compute> consts[kSlots];
FSL_UNROLL
  for (int j = 0; j < kSlots; ++j) {
    const SpanSlot slot = SpanSlotOf(p, g, thread, j);
    weight_first[j] = slot.weight_first;
    consts[j] = GradConstantsOf<Compute>(p, grad_stats, g.batch, slot.klass);
  }
  for (int64_t trip = 0; trip < g.trips; ++trip) {
    const int64_t group = first + trip * plan.lanes;
    Compute x[kSlots], z[kSlots];
    bool valid[kSlots];
    const bool whole =
        LoadSlots(logits, labels, p.vector_loads, g.begin, g.end, group, x, z, valid);
    LogitT result[kSlots];
    FSL_UNROLL
    for (int j = 0; j < kSlots; ++j) {
      const float w =
          (p.weights && valid[j]) ? p.weights[weight_first[j] + trip * weight_step] : 1.0f;
      result[j] = GradOfElement<LogitT, kSquared>(consts[j], x[j], z[j], w);
    }
    if (whole) {
      StoreGroup(out, group, result);
    } else {
      FSL_UNROLL
      for (int j = 0; j < kSlots; ++j) {
        if (valid[j]) out[group + j] = result[j];
      }
    }
  }
}

template <typename LogitT, typename LabelT, bool kSquared,
          typename Compute = typename ComputeTypeOf<LogitT>::type>
FSL_HD void ColumnGradThread(const LaunchPlan& plan, const KernelProblem& p,
                             const float* grad_stats, int64_t block, int thread, LogitT* out) {
  const ColumnBlock g = ColumnBlockOf(plan, p.shape, block, thread);
  if (!g.active) return;
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  const GradConstants<Compute> consts = GradConstantsOf<Compute>(p, grad_stats, g.batch, g.klass);
  for (int64_t n = g.position_begin; n < g.position_end; ++n) {
    const int64_t e = ElementIndex(p.shape, g.batch, n, g.klass);
    const float w = p.weights ? p.weights[WeightIndex(p.strides, g.batch, n, g.klass)] : 1.0f;
    out[e] = GradOfElement<LogitT, kSquared>(consts, Load<Compute>(logits, e),
                                             Load<Compute>(labels, e), w);
  }
}

}  // namespace cuda
}  // namespace fused_segloss
