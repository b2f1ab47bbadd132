// Internal to the CPU kernels of softmax mode (segloss_cpu_softmax_forward.cc,
// segloss_cpu_softmax_grad.cc): the work partition and the staging of one vector of
// positions into compute-type buffers laid out [C][kWidth], so that the per-pixel math of
// segloss_softmax_math.h runs on SIMD vectors across positions (lane j = position j).
// Host only; not for the framework adapters.
//
// Partition. A work item is a run of positions of one image (all C classes of each), for
// both layouts; its size depends on the shape only, never on the thread count, which makes
// the forward's sums deterministic. Items are walked one vector of kWidth positions at a
// time: their logits (and dense labels, and weights) are copied into the buffers, converted
// to the compute type (float32, or float64 for float64 logits). channels_first rows are
// already class-major (one vector load per class); channels_last pixels are transposed.
// Positions past the item's end (the last vector's padding) get logits and labels 0 and
// weight 0, so that they add nothing and stay finite.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "segloss_cpu.h"
#include "segloss_cpu_counts.h"
#include "segloss_cpu_lanes.h"
#include "segloss_math.h"

namespace fused_segloss {
namespace cpu {

// Elements (positions x classes) per work item, with at least kSoftmaxMinItemPositions
// positions (so that the per-item partial sums, C x 8 float64, stay small next to the data).
constexpr int64_t kSoftmaxItemElements = 32768;
constexpr int64_t kSoftmaxMinItemPositions = 1024;
// Hardware vectors per compute vector: two independent chains in flight per operation.
constexpr int kSoftmaxParts = 2;

template <typename Compute>
using SoftmaxVec = typename Lanes<Compute, kSoftmaxParts>::Vec;
template <typename Compute>
constexpr int kSoftmaxWidth = Lanes<Compute, kSoftmaxParts>::kWidth;

struct SoftmaxWorkPlan {
  int64_t positions_per_item = 0;
  int64_t items_per_image = 0;
  int64_t num_items = 0;
};

inline SoftmaxWorkPlan MakeSoftmaxWorkPlan(const ProblemShape& s) {
  SoftmaxWorkPlan plan;
  const int64_t by_size = kSoftmaxItemElements / std::max<int64_t>(s.classes, 1) / 64 * 64;
  plan.positions_per_item = std::max(kSoftmaxMinItemPositions, by_size);
  plan.items_per_image = (s.positions + plan.positions_per_item - 1) / plan.positions_per_item;
  plan.num_items = s.batch * plan.items_per_image;
  return plan;
}

struct SoftmaxItem {
  int64_t batch, begin, end;
};

inline SoftmaxItem SoftmaxItemAt(const ProblemShape& s, const SoftmaxWorkPlan& plan,
                                 int64_t index) {
  SoftmaxItem item;
  item.batch = index / plan.items_per_image;
  item.begin = (index % plan.items_per_image) * plan.positions_per_item;
  item.end = std::min(s.positions, item.begin + plan.positions_per_item);
  return item;
}

// channels_last pixels of one vector, [kWidth][C] in memory, to and from the [C][kWidth]
// compute buffers, element by element: class-major reads for the staging and pixel-major
// writes for the gradient, so that the stores (the costlier side of a strided walk) are the
// contiguous ones.
template <typename Compute>
class PixelTranspose {
 public:
  explicit PixelTranspose(int64_t classes) : classes_(classes) {}

  // buf[c·kWidth + j] = src[j·C + c] for j < n (the caller pads the rest).
  template <typename Storage>
  void In(const Storage* src, int64_t n, Compute* buf) const {
    for (int64_t c = 0; c < classes_; ++c) {
      for (int64_t j = 0; j < n; ++j) {
        buf[c * kWidth + j] = static_cast<Compute>(ToCompute(src[j * classes_ + c]));
      }
    }
  }

  // dst[j·C + c] = buf[c·kWidth + j] for j < n, rounded to the storage type.
  template <typename Storage>
  void Out(const Compute* buf, int64_t n, Storage* dst) const {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t c = 0; c < classes_; ++c) {
        dst[j * classes_ + c] = FromCompute<Storage>::Convert(buf[c * kWidth + j]);
      }
    }
  }

 private:
  static constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  int64_t classes_;
};

// buf[c·kWidth + j] = element (position first + j, class c) for j < n, 0 for the padding.
// `src` is the image's element (first, class 0). Dense logits or labels.
template <typename Compute, typename Storage>
void StageClassMajor(const ProblemShape& s, const Storage* src, int64_t n,
                     PixelTranspose<Compute>& transpose, Compute* buf) {
  using Vec = SoftmaxVec<Compute>;
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const int64_t classes = s.classes;
  if (s.channels_last) {
    transpose.In(src, n, buf);
  } else {
    for (int64_t c = 0; c < classes; ++c) {
      const Storage* row = src + c * s.positions;
      if (n == kWidth) {
        StoreVec(Load<Vec>(row), buf + c * kWidth);
      } else {
        for (int64_t j = 0; j < n; ++j) buf[c * kWidth + j] = static_cast<Compute>(ToCompute(row[j]));
      }
    }
  }
  if (n < kWidth) {
    for (int64_t c = 0; c < classes; ++c) {
      std::fill(buf + c * kWidth + n, buf + (c + 1) * kWidth, Compute(0));
    }
  }
}

// Sparse labels of one vector: klass[j] = the id as a Compute value, keep[j] = 1; an
// ignored or invalid id (and the padding) gets klass -1 (no class is labelled) and keep 0
// (weight 0 for every class). Invalid ids are counted into `counts` when given. Only the
// ids themselves are read, never memory indexed by them.
template <typename Compute, typename IdT>
void StageClassIds(const SeglossProblem& p, const IdT* ids, int64_t n, Compute* klass,
                   Compute* keep, ForwardCounts* counts) {
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const int64_t classes = p.shape.classes;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t id = static_cast<int64_t>(ids[j]);
    const bool ignored = p.has_ignore_index && id == p.ignore_index;
    const bool valid = !ignored && id >= 0 && id < classes;
    klass[j] = valid ? static_cast<Compute>(id) : Compute(-1);
    keep[j] = valid ? Compute(1) : Compute(0);
    if (counts != nullptr && !valid && !ignored) counts->AddBadId(id);
  }
  std::fill(klass + n, klass + kWidth, Compute(-1));
  std::fill(keep + n, keep + kWidth, Compute(0));
}

// Dense labels: every position of the vector is kept, the padding is not.
template <typename Compute>
void StageKeep(int64_t n, Compute* keep) {
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  std::fill(keep, keep + n, Compute(1));
  std::fill(keep + n, keep + kWidth, Compute(0));
}

// The weights of one vector (positions first .. first + n of image b), multiplied into
// `keep` where they do not depend on the class (a per-pixel map, the usual case), else
// staged [C][kWidth] into `by_class` (the kernels multiply them by keep). Returns whether
// by_class was filled. With `invalid`, adds the number of invalid weights among the
// vector's elements (a broadcast value counts once per element it covers, as on the GPU).
template <typename Compute>
bool StageWeights(const SeglossProblem& p, const WeightStrides& st, int64_t b, int64_t first,
                  int64_t n, Compute* keep, Compute* by_class, int64_t* invalid) {
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const int64_t classes = p.shape.classes;
  const float* base = p.weights + WeightIndex(st, b, first, 0);
  int64_t bad = 0;
  if (st.klass == 0) {
    for (int64_t j = 0; j < n; ++j) {
      const float w = base[j * st.position];
      bad += WeightIsValid(w) ? 0 : 1;
      keep[j] *= static_cast<Compute>(w);
    }
    if (invalid != nullptr) *invalid += bad * classes;
    return false;
  }
  for (int64_t c = 0; c < classes; ++c) {
    Compute* dst = by_class + c * kWidth;
    const float* src = base + c * st.klass;
    for (int64_t j = 0; j < n; ++j) {
      const float w = src[j * st.position];
      bad += WeightIsValid(w) ? 0 : 1;
      dst[j] = static_cast<Compute>(w);
    }
    std::fill(dst + n, dst + kWidth, Compute(0));
  }
  if (invalid != nullptr) *invalid += bad;
  return true;
}

// The compute-type buffers one thread stages a vector of positions into, [C][kWidth] unless
// noted. Each pass adds its own (the forward's accumulators, the gradient's u).
template <typename Compute>
struct StagedVector {
  StagedVector(int64_t classes, bool sparse, bool weighted)
      : x(classes * kSoftmaxWidth<Compute>),
        e(classes * kSoftmaxWidth<Compute>),
        z(sparse ? kSoftmaxWidth<Compute> : classes * kSoftmaxWidth<Compute>),
        keep(kSoftmaxWidth<Compute>),
        by_class(weighted ? classes * kSoftmaxWidth<Compute> : 0),
        transpose(classes) {}
  std::vector<Compute> x;         // the logits (the gradient pass then writes dx here)
  std::vector<Compute> e;         // exp(x - m) (the gradient pass then keeps p here)
  std::vector<Compute> z;         // dense labels, or the class id per position ([kWidth])
  std::vector<Compute> keep;      // per position: 0 ignored, invalid or padding, else 1 (x weight)
  std::vector<Compute> by_class;  // class-dependent weights
  PixelTranspose<Compute> transpose;
};

// Stages positions pos .. pos + n - 1 of image `batch` into b: the logits, the labels (dense,
// or the ids and keep), the weights (into keep, or into by_class when they depend on the
// class). Returns whether by_class holds them. With `counts` (the forward pass), invalid ids
// and weights are counted; the gradient passes nullptr (its forward pass checked them).
template <bool kSparse, typename Compute, typename LogitT, typename LabelT>
bool StageVector(const SeglossProblem& p, const WeightStrides& strides, int64_t batch,
                 int64_t pos, int64_t n, const LogitT* logits, const LabelT* labels,
                 StagedVector<Compute>& b, ForwardCounts* counts) {
  const ProblemShape& s = p.shape;
  const int64_t at = ElementIndex(s, batch, pos, 0);
  StageClassMajor(s, logits + at, n, b.transpose, b.x.data());
  if constexpr (kSparse) {
    StageClassIds(p, labels + batch * s.positions + pos, n, b.z.data(), b.keep.data(), counts);
  } else {
    StageClassMajor(s, labels + at, n, b.transpose, b.z.data());
    StageKeep(n, b.keep.data());
  }
  return p.weights != nullptr &&
         StageWeights(p, strides, batch, pos, n, b.keep.data(), b.by_class.data(),
                      counts == nullptr ? nullptr : &counts->invalid_weights);
}

// The staged logits' normaliser, keeping exp(x - m) in b.e.
template <typename Vec, typename Compute>
SoftmaxPixel<Vec> NormaliseStaged(int64_t classes, StagedVector<Compute>& b) {
  constexpr int64_t kWidth = kSoftmaxWidth<Compute>;
  const Compute* x = b.x.data();
  Compute* e = b.e.data();
  return SoftmaxNormaliseKeepingExp<Vec>(
      classes, [&](int64_t c) { return Load<Vec>(x + c * kWidth); },
      [&](int64_t c, const Vec& exp_c) { StoreVec(exp_c, e + c * kWidth); });
}

// Class c's staged labels: the one-hot of the ids (sparse; an ignored, invalid or padding
// position has id -1, so no class) or the dense labels.
template <bool kSparse, typename Vec, typename Compute>
Vec StagedLabel(const StagedVector<Compute>& b, const Vec& ids, int64_t c) {
  if constexpr (kSparse) {
    return Select(Abs(ids - Vec(static_cast<float>(c))) < Vec(0.5f), Vec(1.0f), Vec(0.0f));
  } else {
    return Load<Vec>(b.z.data() + c * kSoftmaxWidth<Compute>);
  }
}

// Class c's staged weights (keep: 0 or the per-pixel weight; by_class: the class's own).
template <typename Vec, typename Compute>
Vec StagedWeight(const StagedVector<Compute>& b, const Vec& keep, bool by_class, int64_t c) {
  return by_class ? Load<Vec>(b.by_class.data() + c * kSoftmaxWidth<Compute>) * keep : keep;
}

// The sum of a compute vector's hardware parts (part 0 + part 1 + ...), in the lanes of a
// one-part vector; float64 has one lane.
inline double SumParts(double v) { return v; }
template <int kParts>
inline VecF<1> SumParts(VecF<kParts> v) {
  VecF<1> r;
  r.part[0] = v.part[0];
  for (int i = 1; i < kParts; ++i) r.part[0] += v.part[i];
  return r;
}

// The float64 sum of a one-part vector's lanes, in a fixed order: the two halves widened
// and added lane by lane, then those lanes in index order.
inline double SumLanes(double v) { return v; }
inline double SumLanes(VecF<1> v) {
  constexpr int kHalf = kHardwareLanes / 2;
  typedef float HalfF __attribute__((vector_size(kHalf * 4)));
  typedef double HalfD __attribute__((vector_size(kHalf * 8)));
  HalfF lo, hi;
  std::memcpy(&lo, &v.part[0], sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v.part[0]) + sizeof(lo), sizeof(hi));
  const HalfD sum = __builtin_convertvector(lo, HalfD) + __builtin_convertvector(hi, HalfD);
  double total = sum[0];
  for (int i = 1; i < kHalf; ++i) total += sum[i];
  return total;
}

// The two passes for one (logits, labels) storage-type pair; kSparse: labels are class ids
// (IdT uint8, int32 or int64), else dense labels of the logits' shape. Instantiated for
// every pair of dtypes.h's lists; segloss_cpu.cc validates the problem and picks the pair.
template <typename LogitT, typename LabelT, bool kSparse>
std::string SoftmaxStatsForTypes(const SeglossProblem& p, const ParallelFor& parallel_for,
                                 float* stats);
template <typename LogitT, typename LabelT, bool kSparse>
std::string SoftmaxLogitGradForTypes(const SeglossProblem& p, const float* grad_stats,
                                     const ParallelFor& parallel_for, void* grad_out);

}  // namespace cpu
}  // namespace fused_segloss
