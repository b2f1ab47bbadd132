// The CUDA kernels' partitioning and per-thread work, as __host__ __device__ functions.
//
// Everything a thread does except the intra-block reduction primitive lives here, so
// that csrc/python/cuda_simulation.cc can run the very same code on the host for every
// (block, thread) of a launch and check the result against the CPU kernel. The .cu
// files add only the __global__ wrappers and BlockReduceLanes (shared memory tree).
//
// Partitioning (both directions use the same plan):
//   rows: one image (channels_last, B rows of N·C contiguous elements) or one
//   (image, class) pair (channels_first, B·C rows of N elements).
//
//   Span mode (channels_first always; channels_last when C is small enough, see below):
//   a block takes one chunk of one row, a contiguous range [begin, end) of flat element
//   indices. Its threads walk the range in trips of `lanes` = 4·threads elements from a
//   4-aligned `origin` <= begin; thread t handles the 4 consecutive elements
//   origin + i·lanes + 4t + j (j = slot 0..3) in trip i, with one vector load when the
//   group lies inside [begin, end) and the pointers are aligned, else masked scalar
//   loads. For channels_last the class of flat element e is e mod C (rows start at
//   multiples of C), and lanes is a multiple of C, so each (thread, slot) sees one
//   class in every trip: 8 accumulators per slot, 32 per thread.
//   The block reduction sums the accumulators of threads with the same classes: threads
//   t and t + q do, where q = C / gcd(C, 4) (q = 1 for channels_first); threads is
//   q·2^p so a shared-memory tree over strides threads/2 .. q ends with the per-lane
//   sums of lanes 0 .. 4q-1 in threads 0 .. q-1. Lane l holds class (origin + l) mod C;
//   4q = lcm(C, 4), so each class has 4q/C lanes, folded in lane order.
//
//   Column mode (channels_last with q > max threads, i.e. large odd C): a block takes
//   a tile of `threads` classes and a chunk of positions of one image; thread t owns
//   class tile·threads + t and walks the chunk's positions (coalesced: neighbouring
//   threads read neighbouring classes). No reduction: each thread's sums are partials.
//
// Two-stage reduction, deterministic: each block writes float64 partial records (8 per
// class it covers) at fixed indices; the combine kernel sums, for each (b, c, column),
// the records of the row's chunks in chunk order. No floating-point atomics.
#pragma once

#include <cstdint>
#include <cstring>

#include "dtypes.h"
#include "segloss_cpu.h"  // DType
#include "segloss_math.h"

// Full unrolling of the per-slot loops on the device (no-op for the host compiler).
#if defined(__CUDACC__)
#define FSL_UNROLL _Pragma("unroll")
#else
#define FSL_UNROLL
#endif

namespace fused_segloss {
namespace cuda {

constexpr int kSlots = 4;                  // consecutive elements per thread and trip
constexpr int64_t kSpanTrips = 16;         // trips per span-mode block
constexpr int64_t kColumnPositions = 64;   // positions per column-mode block
constexpr int kMaxThreadsFloat = 256;      // threads·32 accumulators·sizeof(Compute)
constexpr int kMaxThreadsDouble = 128;     //   = 32 KiB of shared memory for the tree

enum PlanMode : int { kSpanMode = 0, kColumnMode = 1 };

// One launch's geometry, computed on the host, passed to the kernels by value.
struct LaunchPlan {
  int mode = kSpanMode;
  int threads = 0;          // blockDim.x
  int thread_period = 1;    // q: threads t and t + q hold the same classes (span mode)
  int64_t lanes = 0;        // elements per trip of the block (span mode) = 4·threads
  int64_t rows = 0;         // B (channels_last) or B·C (channels_first)
  int64_t row_length = 0;   // span mode: elements per row; column mode: positions N
  int64_t chunk_length = 0; // span mode: elements per block; column mode: positions
  int64_t chunks_per_row = 0;
  int64_t class_tiles = 1;  // column mode: ceil(C / threads)
  int64_t num_blocks = 0;   // rows · class_tiles · chunks_per_row
  int64_t partial_records = 0;  // B · C · chunks_per_row records of 8 doubles
};

FSL_HD int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Floor division (C++ truncates towards zero; negative numerators occur for the masked
// elements before a row's start).
FSL_HD int64_t FloorDiv(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (q * b > a) ? q - 1 : q;
}

FSL_HD int64_t Gcd(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

FSL_HD int MaxThreadsFor(DType logits_dtype) {
  return logits_dtype == DType::kFloat64 ? kMaxThreadsDouble : kMaxThreadsFloat;
}

// The plan for one problem shape (a pure function of the shape and the compute type:
// the same on every GPU, so results do not depend on the device's SM count).
inline LaunchPlan MakeLaunchPlan(const ProblemShape& shape, int max_threads) {
  LaunchPlan plan;
  // Total for any input (callers may ask for the workspace size before validating):
  // negative sizes count as 0 and C = 0 as 1, which gives an empty launch.
  ProblemShape s = shape;
  if (s.batch < 0 || s.positions < 0 || s.classes <= 0) {
    s.batch = s.batch < 0 || s.classes <= 0 ? 0 : s.batch;
    s.positions = s.positions < 0 ? 0 : s.positions;
    s.classes = s.classes <= 0 ? 1 : s.classes;
  }
  const int64_t q = s.channels_last ? s.classes / Gcd(s.classes, kSlots) : 1;
  plan.rows = s.channels_last ? s.batch : s.batch * s.classes;
  if (q <= max_threads) {
    plan.mode = kSpanMode;
    int64_t threads = q;
    while (threads * 2 <= max_threads) threads *= 2;
    plan.threads = static_cast<int>(threads);
    plan.thread_period = static_cast<int>(q);
    plan.lanes = kSlots * threads;
    plan.row_length = s.channels_last ? s.positions * s.classes : s.positions;
    plan.chunk_length = kSpanTrips * plan.lanes;
    plan.class_tiles = 1;
  } else {
    plan.mode = kColumnMode;
    plan.threads = max_threads;
    plan.thread_period = 1;
    plan.lanes = 0;
    plan.row_length = s.positions;
    plan.chunk_length = kColumnPositions;
    plan.class_tiles = CeilDiv(s.classes, max_threads);
  }
  plan.chunks_per_row = CeilDiv(plan.row_length, plan.chunk_length);
  plan.num_blocks = plan.rows * plan.class_tiles * plan.chunks_per_row;
  plan.partial_records = s.batch * s.classes * plan.chunks_per_row;
  return plan;
}

// The kernels' view of a problem: shape, type-erased device pointers, weight strides.
struct KernelProblem {
  ProblemShape shape;
  const void* logits = nullptr;
  const void* labels = nullptr;
  const float* weights = nullptr;  // canonical view, broadcast through `strides`
  WeightStrides strides;
  const float* pos_weight = nullptr;
  bool vector_loads = false;  // pointers aligned for whole-group loads/stores
};

// Invalid values seen by one thread (labels outside [0, 1], bad weights).
struct ValueCounts {
  int64_t labels = 0;
  int64_t weights = 0;
};

// Index of the partial record of (image b, class c, chunk) in the workspace.
FSL_HD int64_t PartialIndex(const LaunchPlan& plan, const ProblemShape& s, int64_t b,
                            int64_t c, int64_t chunk) {
  return s.channels_last ? (b * plan.chunks_per_row + chunk) * s.classes + c
                         : (b * s.classes + c) * plan.chunks_per_row + chunk;
}

// ---------------------------------------------------------------------------------
// Span-mode geometry of one block and of one (thread, slot).
struct SpanBlock {
  int64_t batch = 0;
  int64_t klass = 0;     // channels_first: the row's class
  int64_t chunk = 0;
  int64_t row_base = 0;  // flat index of the row's first element
  int64_t begin = 0, end = 0;
  int64_t origin = 0;    // begin rounded down to a multiple of 4
  int64_t trips = 0;
};

FSL_HD SpanBlock SpanBlockOf(const LaunchPlan& plan, const ProblemShape& s, int64_t block) {
  SpanBlock g;
  const int64_t row = block / plan.chunks_per_row;
  g.chunk = block % plan.chunks_per_row;
  g.batch = s.channels_last ? row : row / s.classes;
  g.klass = s.channels_last ? 0 : row % s.classes;
  g.row_base = row * plan.row_length;
  g.begin = g.row_base + g.chunk * plan.chunk_length;
  const int64_t row_end = g.row_base + plan.row_length;
  g.end = g.begin + plan.chunk_length < row_end ? g.begin + plan.chunk_length : row_end;
  g.origin = g.begin - g.begin % kSlots;
  g.trips = CeilDiv(g.end - g.origin, plan.lanes);
  return g;
}

// What is constant for one (thread, slot) across the trips of a span block: the class
// and the weights index of the slot's element in trip 0 (meaningful only for elements
// inside the block's range). Trip i moves the element by `lanes` and the weights index
// by SpanWeightStep.
struct SpanSlot {
  int64_t klass = 0;
  int64_t weight_first = 0;
};

// Flat index of thread's slot-0 element in trip 0 (slot j adds j).
FSL_HD int64_t SpanFirstElement(const SpanBlock& g, int thread) {
  return g.origin + static_cast<int64_t>(kSlots) * thread;
}

FSL_HD int64_t SpanWeightStep(const LaunchPlan& plan, const KernelProblem& p) {
  const int64_t position_step = p.shape.channels_last ? plan.lanes / p.shape.classes : plan.lanes;
  return position_step * p.strides.position;
}

FSL_HD SpanSlot SpanSlotOf(const KernelProblem& p, const SpanBlock& g, int thread, int slot) {
  const ProblemShape& s = p.shape;
  const int64_t first = SpanFirstElement(g, thread) + slot;
  SpanSlot sl;
  int64_t position;
  if (s.channels_last) {
    sl.klass = first % s.classes;
    position = FloorDiv(first - g.row_base, s.classes);
  } else {
    sl.klass = g.klass;
    position = first - g.row_base;
  }
  sl.weight_first = WeightIndex(p.strides, g.batch, position, sl.klass);
  return sl;
}

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
      ForwardTerms<Compute, kSquared>(x[j], z[j], w[j], pos_weight[j], t);
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

// ---------------------------------------------------------------------------------
// Column mode: block -> (image, class tile, chunk of positions); one class per thread.
struct ColumnBlock {
  int64_t batch = 0, klass = 0, chunk = 0, position_begin = 0, position_end = 0;
  bool active = false;  // the thread's class exists (last tile may be ragged)
};

FSL_HD ColumnBlock ColumnBlockOf(const LaunchPlan& plan, const ProblemShape& s,
                                 int64_t block, int thread) {
  ColumnBlock g;
  g.chunk = block % plan.chunks_per_row;
  const int64_t tile = (block / plan.chunks_per_row) % plan.class_tiles;
  g.batch = block / (plan.chunks_per_row * plan.class_tiles);
  g.klass = tile * plan.threads + thread;
  g.active = g.klass < s.classes;
  g.position_begin = g.chunk * plan.chunk_length;
  const int64_t end = g.position_begin + plan.chunk_length;
  g.position_end = end < s.positions ? end : s.positions;
  return g;
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
    ForwardTerms<Compute, kSquared>(x, z, static_cast<Compute>(wf), pos_weight, t);
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
  return k;
}

// One element's gradient, converted to the logits' storage type.
template <typename LogitT, bool kSquared, typename Compute>
FSL_HD LogitT GradOfElement(const GradConstants<Compute>& k, Compute x, Compute z, float w) {
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
