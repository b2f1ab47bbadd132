// The CUDA kernels' partition of a problem: which elements each block and thread covers,
// and where each block's partial sums go. __host__ __device__ and free of CUDA includes,
// so that the launcher (segloss_cuda_launch.cu), the kernels (segloss_cuda_thread.h,
// segloss_cuda_kernels.cuh) and the host simulation (csrc/python/cuda_simulation.cc) all
// use this very code.
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
//   Softmax mode (activation = softmax, either layout): a block takes a chunk of
//   `threads`·kSoftmaxPixelsPerThread positions of one image; thread t owns the pixels
//   chunk start + i·threads + t and all their classes (segloss_cuda_softmax.h).
//
// Two-stage reduction, deterministic: each block writes float64 partial records (8 per
// class it covers) at fixed indices; the combine kernel sums, for each (b, c, column),
// the records of the row's chunks in chunk order. No floating-point atomics.
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "segloss_math.h"

namespace fused_segloss {
namespace cuda {

constexpr int kSlots = 4;                  // consecutive elements per thread and trip
constexpr int64_t kSpanTrips = 16;         // trips per span-mode block
constexpr int64_t kColumnPositions = 64;   // positions per column-mode block
constexpr int kMaxThreadsFloat = 256;      // threads·32 accumulators·sizeof(Compute)
constexpr int kMaxThreadsDouble = 128;     //   = 32 KiB of shared memory for the tree

enum PlanMode : int { kSpanMode = 0, kColumnMode = 1, kSoftmaxMode = 2 };

constexpr int kSoftmaxPixelsPerThread = 3;  // pixels whose normalisers a thread keeps

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
  int64_t class_tiles = 1;  // column mode: ceil(C / threads); softmax: ceil(C / kSlots)
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
// Plans are total for any input (callers may ask for the workspace size before
// validating): negative sizes count as 0 and C = 0 as 1, which gives an empty launch.
inline ProblemShape PlannableShape(const ProblemShape& shape) {
  ProblemShape s = shape;
  if (s.batch < 0 || s.positions < 0 || s.classes <= 0) {
    s.batch = s.batch < 0 || s.classes <= 0 ? 0 : s.batch;
    s.positions = s.positions < 0 ? 0 : s.positions;
    s.classes = s.classes <= 0 ? 1 : s.classes;
  }
  return s;
}

inline LaunchPlan MakeLaunchPlan(const ProblemShape& shape, int max_threads) {
  LaunchPlan plan;
  const ProblemShape s = PlannableShape(shape);
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

// The softmax plan (both layouts): rows are images, a block covers a chunk of
// threads·kSoftmaxPixelsPerThread positions and, in rounds of kSlots classes
// (class_tiles), every class. Records are indexed by PartialIndex like the other modes,
// so the second stage is the same.
inline LaunchPlan MakeSoftmaxLaunchPlan(const ProblemShape& shape, int max_threads) {
  LaunchPlan plan;
  const ProblemShape s = PlannableShape(shape);
  plan.mode = kSoftmaxMode;
  plan.threads = max_threads;
  plan.thread_period = 1;
  plan.lanes = 0;
  plan.rows = s.batch;
  plan.row_length = s.positions;
  plan.chunk_length = static_cast<int64_t>(kSoftmaxPixelsPerThread) * max_threads;
  plan.chunks_per_row = CeilDiv(plan.row_length, plan.chunk_length);
  plan.class_tiles = CeilDiv(s.classes, kSlots);
  plan.num_blocks = plan.rows * plan.chunks_per_row;
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
  FocalOptions focal;         // the focal modulation of ce_sum (plain ce by default)
  bool vector_loads = false;  // pointers aligned for whole-group loads/stores
  // Softmax mode (the sigmoid kernels take `squared` as a template argument instead).
  bool squared = false;
  bool has_ignore_index = false;
  int64_t ignore_index = 0;
};

// Invalid values seen by one thread (labels outside [0, 1], bad weights).
struct ValueCounts {
  int64_t labels = 0;
  int64_t weights = 0;
};

// Invalid sparse class ids seen by one thread: how many, the smallest and the largest.
struct ClassIdCounts {
  int64_t count = 0;
  int64_t min = 0;
  int64_t max = 0;
};

// The launch keeps the extremes in two uint64 counters that start at 0 and only grow
// (atomicMax): int64 order mapped to uint64 order by flipping the sign bit, and the
// minimum stored complemented (so its largest code is the smallest id).
FSL_HD unsigned long long EncodeIdMax(int64_t id) {
  return static_cast<unsigned long long>(id) ^ 0x8000000000000000ull;
}
FSL_HD unsigned long long EncodeIdMin(int64_t id) { return ~EncodeIdMax(id); }
FSL_HD int64_t DecodeIdMax(unsigned long long code) {
  return static_cast<int64_t>(code ^ 0x8000000000000000ull);
}
FSL_HD int64_t DecodeIdMin(unsigned long long code) { return DecodeIdMax(~code); }

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

}  // namespace cuda
}  // namespace fused_segloss
