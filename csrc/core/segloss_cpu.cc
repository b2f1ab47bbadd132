// CPU kernels: one pass over the data per direction.
//
// Structure of both passes. The elements are cut into fixed work items (a run of
// positions of one image, or of one (image, class) row for channels_first), and an item
// into blocks of whole "rows". A row is `period` consecutive elements whose classes repeat
// from row to row (channels_last: a multiple of C; channels_first: one class), so lane j
// of a row always belongs to the same class. Rows are processed as SIMD vectors of
// VecF lanes (simd.h; the last vector of a row is partial when the period is
// not a multiple of the width). Both passes walk a block's rows in memory order. The
// forward adds each vector's 8 terms into float32 accumulators kept per vector position
// of the row (in L1), folds them into per-lane float64 sums at the end of the block, and
// reduces the item's lanes to classes at its end; item partials are summed in item
// order, so the result does not depend on the thread count. The gradient writes each
// vector once (in place is fine: each vector is loaded before it is stored).
#include "segloss_cpu.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "segloss_cpu_lanes.h"

namespace fused_segloss {
namespace {

constexpr int64_t kItemElements = 32768;  // elements per work item (fixed: determinism)
// Rows per block: about kBlockElements elements, and at most kMaxBlockRows, so a float32
// lane never sums more than that many terms before it is folded into float64 (accuracy
// on long runs of one value). Each block ends with a fold of every accumulator: at 2048
// elements that was about 7% of the forward pass (AVX-512, Zen 4; 8192 measured 9% faster
// on channels_last data). The weight buffer of a block is 32 KiB at this size.
// At most 120 rows also keeps a deferred log run's 1 + D <= 2^rows finite in float32
// (Log1pProductStep).
constexpr int64_t kBlockElements = 8192;
constexpr int64_t kMaxBlockRows = 120;
constexpr int64_t kMinBlockRows = 8;

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

// The lane geometry shared by every item of a problem.
struct RowGeometry {
  int64_t period;       // elements per row
  int64_t vectors;      // vectors per row (the last may be partial)
  int64_t padded;       // vectors * width: lanes of the per-lane arrays
  int64_t block_rows;   // rows per block
};

// Hardware vectors per compute vector (see simd.h): the gradient interleaves two parts
// for more independent work in flight. The forward does too with AVX-512 (32 registers;
// Zen 4, in cache, 655k elements: float32 0.68 -> 0.66 ms, bfloat16 logits with uint8
// labels 0.77 -> 0.67 ms), not with AVX2 (16 registers: no faster on Zen 3).
constexpr int kForwardParts = kHardwareLanes == 16 ? 2 : 1;
constexpr int kGradientParts = 2;

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

ItemSpan SpanOf(const ProblemShape& shape, const Item& item) {
  const int64_t width = shape.channels_last ? shape.classes : 1;
  const int64_t klass = shape.channels_last ? 0 : item.klass;
  return {ElementIndex(shape, item.batch, item.begin, klass), (item.end - item.begin) * width};
}

// fn(lane, class) for each lane of a row: lane j holds class j % C (channels_last) or the
// item's class. Counted, not divided (a 64-bit modulo per lane for every work item).
template <typename Fn>
void ForEachLaneClass(const ProblemShape& shape, const Item& item, int64_t period, Fn&& fn) {
  for (int64_t lane = 0, klass = 0; lane < period; ++lane) {
    fn(lane, shape.channels_last ? klass : item.klass);
    if (++klass == shape.classes) klass = 0;
  }
}

int64_t CountInvalidWeights(const float* w, int64_t count) {
  int64_t invalid = 0;
  for (int64_t e = 0; e < count; ++e) invalid += WeightIsValid(w[e]) ? 0 : 1;
  return invalid;
}

// The block's `count` weights (broadcast resolved), in element order. Blocks start at a
// position boundary (their offset is a multiple of the period, itself a multiple of C).
// Where the map's values for the block are contiguous (a full map; channels_first broadcast
// over classes; C = 1) the map itself is returned; a map broadcast over the classes of
// channels_last data is expanded into `buffer` with vector permutes; other broadcasts
// fill `buffer` element by element. Why: the element-by-element fill was 31% of the
// weighted forward pass and half of the weighted gradient (AVX-512, Zen 4, in cache).
// When `invalid` is given it gets the number of invalid weights among the block's
// elements (a broadcast value counts once per element it covers, as on the GPU).
const float* BlockWeights(const SeglossProblem& p, const WeightStrides& strides,
                          const Item& item, int64_t offset, int64_t count, float* buffer,
                          int64_t* invalid) {
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

template <typename Storage>
int64_t CountNonFinite(const Storage* x, int64_t count) {
  int64_t nonfinite = 0;
  for (int64_t i = 0; i < count; ++i) {
    const auto v = ToCompute(x[i]);
    using C = decltype(v);
    nonfinite += Abs(v) <= std::numeric_limits<C>::max() ? 0 : 1;  // NaN too
  }
  return nonfinite;
}

// The block's weights at element i (no pointer arithmetic on the null buffer when unweighted).
template <bool kWeighted>
const float* WeightsAt(const float* w, int64_t i) {
  return kWeighted ? w + i : nullptr;
}

// The streams of a vector's logits, labels and (when weighted) weights, prefetched ahead
// (segloss_cpu_lanes.h).
template <int kWidth, bool kWeighted, typename LogitT, typename LabelT>
void PrefetchInputs(const LogitT* x, const LabelT* z, const float* w) {
  PrefetchAhead<kWidth>(x);
  PrefetchAhead<kWidth>(z);
  if constexpr (kWeighted) PrefetchAhead<kWidth>(w);
}

template <typename Vec>
auto MaskOfFirst(int count) {
  return FirstLanes(count, static_cast<Vec*>(nullptr));
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

// ---------------------------------------------------------------------------------------
// Forward: the contributions of one vector of elements.
template <typename Vec>
using MaskOf = decltype(Vec() > Vec());

// Where every element's log term log1p(e) has weight 1 (no weight map, no pos_weight), the
// forward leaves it out of each element's cross-entropy and sums it per accumulator as a
// Log1pProductStep run, folded with one Log1pWide per block: 2 vector operations per
// element instead of Log1pUnit's 11, and off the exp -> log dependency chain. float32
// compute only (float64 inputs keep the library log1p per element).
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

// `exp_ahead`, when given, is ExpOfNegativeAbs of this vector's logits, computed earlier
// (the pipeline in AccumulateBlock); else it is computed here.
template <typename Vec, bool kSquared, bool kWeighted, bool kPartial, typename LogitT,
          typename LabelT, typename PosWeight>
FSL_HD void ElementTerms(const LogitT* x, const LabelT* z, const float* w,
                         PosWeight pos_weight, int lanes, Contribution<Vec>& out,
                         const Vec* exp_ahead = nullptr) {
  const Vec zero(0.0f);
  constexpr bool kDefer = kLogDeferred<Vec, kWeighted, PosWeight>;
  const ElementInputs<Vec> in = LoadInputs<Vec, kWeighted, kPartial>(x, z, w, lanes);
  const Vec e = exp_ahead ? *exp_ahead : ExpOfNegativeAbs(in.x);
  ForwardTermsGivenExp<Vec, kSquared, PosWeight, kDefer>(in.x, e, in.z, in.w, pos_weight,
                                                         out.terms, &out.e);
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
          typename PosWeight>
__attribute__((noinline)) void PartialElementTerms(const LogitT* x, const LabelT* z,
                                                   const float* w, PosWeight pos_weight,
                                                   int lanes, Contribution<Vec>& out) {
  ElementTerms<Vec, kSquared, kWeighted, true>(x, z, w, pos_weight, lanes, out);
}

// Adds one vector's contribution to its row position's accumulators. Labels outside
// [0, 1] only set lanes of `any_invalid`, a register for the whole block, and a block
// with any is counted exactly (rarely: such input is an error): a per-lane count in L1
// was a select, a load-add and a store per vector, 5% of the forward in cache (AVX-512,
// Zen 4: 0.605 -> 0.577 ms per 655k elements). Packing the three hard counts into one
// integer accumulator the same way measured 4% slower (GCC's mask materialisation).
// The hard counts: slot + (m ? w : 0) is m ? slot + w : slot (slots start at +0 and only
// grow, so adding 0 never changes one): one masked add with AVX-512 (simd.h's AddWhere).
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
// input. Each vector position of the row has its own float32 accumulators `acc`
// ([vectors][kAccumulatorSlots], in L1): a load, add and store per statistic, which measured no
// slower in cache (1.49 against 1.52 ns per element) than a column-by-column walk with
// register accumulators, while that walk lost 1.4-2x to cache misses on channels_last
// data (stride = one row, 25 rows per column: too short a stream to prefetch). Full
// vectors are inlined; row ends go through the out-of-line partial function, in a separate
// statement so that the inlined terms never have their address taken (that made GCC keep
// them all on the stack).
template <typename Compute, bool kSquared, bool kWeighted, bool kPosWeighted, typename LogitT,
          typename LabelT>
int64_t AccumulateBlock(const LogitT* x, const LabelT* z, const float* w, int64_t count,
                        const RowGeometry& g, const Compute* pos_weight_lanes,
                        typename Lanes<Compute, kForwardParts>::Vec* acc, double* lane_sums) {
  using Vec = typename Lanes<Compute, kForwardParts>::Vec;
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
                                                  pos_weight_at(v), lanes, c);
    AddTerms<Vec, kWeighted, kDefer>(acc + v * kAccumulatorSlots, c, any_invalid);
  };
  const int64_t full_rows = count / g.period, rest = count % g.period;
  // The full vectors of the full rows in memory order, software-pipelined: each iteration
  // first issues the exp of the next full vector, then the rest of its own terms from the
  // exp the previous iteration issued. Why: one vector's chain (exp, then 1/(1+e), the
  // sigmoid and the sums) is longer than the out-of-order core looks ahead, so the loop
  // ran at the chain's latency; split in two, each iteration's halves are independent. The
  // same operations on the same values (the sums bit for bit); in cache (Zen 4,
  // fsl_kernel_bench) the forward 9-16% faster (README: "Zen 4 runs of cc01fa6 and 55f2e1f").
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
                                                  pos_weight_at(v), kWidth, c, &exp_ahead);
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

// The 4 per-lane gradient coefficients of vector `lane0` of a row: pos_weight, g_ce,
// g_inter, g_pred (rows of the [4][padded] pattern).
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

// Gradient of one vector of a row.
template <typename Vec, bool kSquared, bool kWeighted, bool kPartial, typename LogitT,
          typename LabelT>
FSL_HD void GradientElements(const LogitT* x, const LabelT* z, const float* w,
                             const GradientPattern<Vec>& pattern, int lanes, LogitT* out,
                             const Vec* exp_ahead = nullptr) {
  const ElementInputs<Vec> in = LoadInputs<Vec, kWeighted, kPartial>(x, z, w, lanes);
  const Vec e = exp_ahead ? *exp_ahead : ExpOfNegativeAbs(in.x);
  const Vec g = LogitGradientGivenExp<Vec, kSquared>(in.x, e, in.z, in.w, pattern.pos_weight,
                                                     pattern.g_ce, pattern.g_inter,
                                                     pattern.g_pred);
  if constexpr (kPartial) {
    StorePartial(g, out, lanes);
  } else {
    StoreVec(g, out);
  }
}

// Row ends only; out of line for the reason given at PartialElementTerms. It loads its
// own pattern: passing the full vectors' pattern by address made GCC store all of it to
// the stack on every full vector too.
template <typename Vec, bool kSquared, bool kWeighted, typename Compute, typename LogitT,
          typename LabelT>
__attribute__((noinline)) void PartialGradientElements(const LogitT* x, const LabelT* z,
                                                       const float* w,
                                                       const Compute* pattern_lanes,
                                                       int64_t padded, int64_t lane0,
                                                       int lanes, LogitT* out) {
  GradientElements<Vec, kSquared, kWeighted, true>(
      x, z, w, LoadPattern<Vec>(pattern_lanes, padded, lane0), lanes, out);
}

template <typename Compute, bool kSquared, bool kWeighted, typename LogitT, typename LabelT>
void GradientBlock(const LogitT* x, const LabelT* z, const float* w, int64_t count,
                   const RowGeometry& g, const Compute* pattern_lanes, LogitT* out) {
  using Vec = typename Lanes<Compute, kGradientParts>::Vec;
  constexpr int kWidth = Lanes<Compute, kGradientParts>::kWidth;
  const int64_t full_vectors = g.period / kWidth;
  const int tail_lanes = static_cast<int>(g.period % kWidth);
  const int64_t full_rows = count / g.period;
  // The full rows, pipelined like AccumulateBlock's: the next full vector's exp is issued
  // before this vector's gradient (the same values bit for bit; in cache on Zen 4 the
  // gradient 19-23% faster). In place stays safe: the logits read ahead lie past every
  // element written so far.
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
        LoadPattern<Vec>(pattern_lanes, g.padded, v * kWidth), kWidth, out + i, &exp_ahead);
    if (row_ends) {
      if (tail_lanes > 0) {
        PartialGradientElements<Vec, kSquared, kWeighted>(
            x + i + kWidth, z + i + kWidth, WeightsAt<kWeighted>(w, i + kWidth), pattern_lanes,
            g.padded, full_vectors * kWidth, tail_lanes, out + i + kWidth);
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
            LoadPattern<Vec>(pattern_lanes, g.padded, lane0), kWidth, out + i);
      } else {
        PartialGradientElements<Vec, kSquared, kWeighted>(
            x + i, z + i, WeightsAt<kWeighted>(w, i), pattern_lanes, g.padded, lane0,
            static_cast<int>(row_count - lane0), out + i);
      }
    }
  }
}

struct Counts {
  int64_t invalid_labels = 0, invalid_weights = 0, nonfinite_logits = 0;
  bool nonbinary_labels = false;  // a label other than 0 and 1 (LabelBytes only)
};

// One block's labels as bytes for LabelBytes: 1 where the label is exactly 1, else 0.
// Returns whether any label was neither 0 nor 1 (the bytes are then not used). Run right
// after the block's AccumulateBlock, so its labels come from L1/L2 rather than memory;
// compared in the labels' own precision (a float64 label of 1 - 1e-12 is not binary).
// (__restrict: uint8_t may alias anything, and GCC would not vectorise the loop without it.)
template <typename LabelT>
bool WriteLabelBytesPlain(const LabelT* __restrict z, int64_t n, uint8_t* __restrict out) {
  using Value = decltype(ToCompute(z[0]));
  unsigned nonbinary = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Value v = ToCompute(z[i]);
    out[i] = static_cast<uint8_t>(v == Value(1));
    nonbinary |= static_cast<unsigned>((v != Value(0)) & (v != Value(1)));
  }
  return nonbinary != 0;
}

template <typename LabelT>
bool WriteLabelBytes(const LabelT* z, int64_t n, uint8_t* out) {
  return WriteLabelBytesPlain(z, n, out);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// float32 labels: 64 at a time, the bytes written with non-temporal stores (they are read
// once, by the gradient pass after the whole forward, so caching them only evicts data).
template <>
bool WriteLabelBytes(const float* __restrict z, int64_t n, uint8_t* __restrict out) {
  // Plainly up to the first 64-byte line of the output, then whole lines.
  int64_t i = std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(out) % 64) % 64);
  const bool head_nonbinary = WriteLabelBytesPlain(z, i, out);
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  __mmask16 binary = 0xFFFF;  // lanes where every label so far was 0 or 1
  for (; i + 64 <= n; i += 64) {
    uint64_t ones = 0;
    for (int k = 0; k < 4; ++k) {
      const __m512 v = _mm512_loadu_ps(z + i + 16 * k);
      const __mmask16 is_one = _mm512_cmp_ps_mask(v, one, _CMP_EQ_OQ);
      ones |= uint64_t{is_one} << (16 * k);
      binary &= is_one | _mm512_cmp_ps_mask(v, zero, _CMP_EQ_OQ);
    }
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + i),
                        _mm512_maskz_set1_epi8(ones, 1));
  }
  const bool tail_nonbinary = WriteLabelBytesPlain(z + i, n - i, out + i);
  return head_nonbinary | (binary != 0xFFFF) | tail_nonbinary;
}
inline void FenceLabelBytes() { _mm_sfence(); }
#else
inline void FenceLabelBytes() {}
#endif

std::string CountsError(const Counts& counts) {
  if (counts.nonfinite_logits > 0) {
    return "`logits` contain " + std::to_string(counts.nonfinite_logits) +
           " NaN or Inf value(s) (check_numerics=True)";
  }
  return InvalidValuesMessage(counts.invalid_labels, counts.invalid_weights);
}

template <typename LogitT, typename LabelT, bool kSquared, bool kWeighted, bool kPosWeighted>
std::string StatsImpl(const SeglossProblem& p, const ParallelFor& parallel_for, float* stats,
                      LabelBytes* label_bytes) {
  using Compute = typename ComputeTypeOf<LogitT>::type;
  const ProblemShape& s = p.shape;
  const StatsWorkPlan plan = MakeStatsWorkPlan(s);
  const RowGeometry geo = MakeRowGeometry<Compute, kForwardParts>(s);
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  const WeightStrides strides =
      MakeWeightStrides(s, p.weights_batch, p.weights_positions, p.weights_classes);
  std::vector<double> partials(plan.num_items * classes_per_item * kNumStats, 0.0);
  std::vector<Counts> item_counts(plan.num_items);
  const auto* logits = static_cast<const LogitT*>(p.logits);
  const auto* labels = static_cast<const LabelT*>(p.labels);
  uint8_t* bytes = label_bytes != nullptr ? label_bytes->data : nullptr;

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
      Counts& counts = item_counts[index];
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
        counts.invalid_labels += AccumulateBlock<Compute, kSquared, kWeighted, kPosWeighted>(
            x, z, w, n, geo, pos_weight.data(), acc.data(), lane_sums.data());
        if (bytes != nullptr) {
          counts.nonbinary_labels |= WriteLabelBytes(z, n, bytes + span.base + offset);
        }
      }
      // Lanes -> the item's classes, C lanes at a time (the period is a multiple of C
      // for channels_last; channels_first has one class per item), each class's lanes
      // still added in lane order (the same sums, bit for bit). With a modulo per lane this
      // was 5.4% of the forward's perf samples (3.2% now; forward 1-3% faster in cache).
      double* partial = partials.data() + index * classes_per_item * kNumStats;
      for (int64_t first = 0; first < geo.period; first += classes_per_item) {
        for (int64_t lc = 0; lc < classes_per_item; ++lc) {
          for (int k = 0; k < kNumStats; ++k) {
            partial[lc * kNumStats + k] += lane_sums[k * geo.padded + first + lc];
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
  // Cost hint: ~2 ns per element. The fence: WriteLabelBytes' non-temporal stores are
  // weakly ordered; they must be visible before the op's output is handed on.
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 2,
               [&](int64_t first, int64_t last) {
                 run_items(first, last);
                 if (bytes != nullptr) FenceLabelBytes();
               });

  Counts total;
  for (const Counts& c : item_counts) {
    total.invalid_labels += c.invalid_labels;
    total.invalid_weights += c.invalid_weights;
    total.nonfinite_logits += c.nonfinite_logits;
    total.nonbinary_labels |= c.nonbinary_labels;
  }
  const std::string error = CountsError(total);
  if (!error.empty()) return error;
  if (label_bytes != nullptr) label_bytes->all_binary = !total.nonbinary_labels;

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

template <typename LogitT, typename LabelT, bool kSquared, bool kWeighted>
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
        GradientBlock<Compute, kSquared, kWeighted>(logits + at, labels + at, w, n, geo,
                                                    pattern.data(), out + at);
      }
    }
  };
  const int64_t classes_per_item = s.channels_last ? s.classes : 1;
  parallel_for(plan.num_items, plan.positions_per_item * classes_per_item * 2, run_items);
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

template <typename LogitT, typename LabelT>
struct StatsFn {
  static std::string Run(const SeglossProblem& p, const ParallelFor& pf, float* stats,
                         LabelBytes* label_bytes) {
    // Without pos_weight the forward takes the short cross-entropy (segloss_math.h), a
    // compile-time variant of its own (the gradient's saving would be one operation). Not
    // for float64 logits, whose one-lane loop is bound by its library exp and log1p: the
    // variant would add build time (the core's largest file) and no measurable speed.
    constexpr bool kShortCrossEntropy =
        !std::is_same_v<typename ComputeTypeOf<LogitT>::type, double>;
    return WithVariant(p, [&](auto squared, auto weighted) {
      if constexpr (kShortCrossEntropy) {
        if (p.pos_weight == nullptr) {
          return StatsImpl<LogitT, LabelT, squared.value, weighted.value, false>(
              p, pf, stats, label_bytes);
        }
      }
      return StatsImpl<LogitT, LabelT, squared.value, weighted.value, true>(p, pf, stats,
                                                                            label_bytes);
    });
  }
};
template <typename LogitT, typename LabelT>
struct GradFn {
  static std::string Run(const SeglossProblem& p, const float* g, const ParallelFor& pf,
                         void* out) {
    return WithVariant(p, [&](auto squared, auto weighted) {
      return GradImpl<LogitT, LabelT, squared.value, weighted.value>(p, g, pf, out);
    });
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
  // Whole vectors per row where that stays small (every C up to 16 classes); else one
  // position per row, its last vector partial. The widest compute vector sets the width.
  constexpr int64_t kWidth = 2 * kHardwareLanes;
  if (!shape.channels_last) return kWidth;
  const int64_t lcm = std::lcm(std::max<int64_t>(shape.classes, 1), kWidth);
  return lcm <= 16 * kWidth ? lcm : shape.classes;
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
                            float* stats_out, LabelBytes* label_bytes) {
  std::string error = ValidateProblem(problem);
  if (error.empty()) error = ValidatePosWeight(problem);
  if (!error.empty()) return error;
  if (label_bytes != nullptr) {
    label_bytes->all_binary = false;
    const DType d = problem.labels_dtype;
    if (d == DType::kUInt8 || d == DType::kBool) {
      return "label bytes are only written for float labels (these labels are 1 byte already)";
    }
    const ProblemShape& s = problem.shape;
    if (label_bytes->data == nullptr && s.batch * s.positions * s.classes > 0) {
      return "the label bytes' buffer must not be null";
    }
  }
  return Dispatch<StatsFn>(problem, parallel_for, stats_out, label_bytes);
}

std::string ComputeLogitGradCpu(const SeglossProblem& problem, const float* grad_stats,
                                const ParallelFor& parallel_for, void* grad_logits_out) {
  std::string error = ValidateProblem(problem);
  if (!error.empty()) return error;
  return Dispatch<GradFn>(problem, grad_stats, parallel_for, grad_logits_out);
}

}  // namespace fused_segloss
