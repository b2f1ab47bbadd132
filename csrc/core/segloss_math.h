// The per-element math of fused_segloss, in one place: the eight forward terms of one
// element (summed into the [B, C, 8] statistics) and its logit gradient given the upstream
// gradients of those sums, plus the index math of the canonical [B, N, C] / [B, C, N] view.
//
// Every kernel (CPU, CUDA, and the XLA FFI handlers, which call the CPU and CUDA
// kernels) evaluates the loss terms through the functions in this header, so the
// formula exists exactly once. Everything here is branch-free and written against a
// handful of primitives (Select, Abs, MulAdd, Reciprocal, FloatBits, BitsToFloat) so that
// the same templates run on scalars (float on CUDA, double anywhere) and on the CPU's
// SIMD vectors (VecF in simd.h supplies vector overloads, found by argument lookup).
//
// Notation: x = logit, z = label in [0, 1], w = element weight (>= 0),
// pw = pos_weight of the element's class, k = 2 if squared else 1.
//   e  = exp(-|x|)                       (in (0, 1]; the only exp per element)
//   l  = log1p(e)                        (the only log per element)
//   softplus(x)  = max(x, 0) + l,  softplus(-x) = max(-x, 0) + l
//   p  = sigmoid(x) = 1/(1+e) if x >= 0 else e/(1+e);   p(1-p) = e/(1+e)^2
//   ce = pw·z·softplus(-x) + (1-z)·softplus(x)
//   ce' = dce/dx = (1-z)·p - pw·z·(1-p)
// The statistics of (image b, class c) are sums over that image's elements of class c of
//   ce_sum = w·ce, weight_sum = w, intersection = w·z·p, pred_sum = w·p^k, label_sum = w·z^k,
//   hard_tp = w·[x > 0]·[z >= 0.5], hard_pred = w·[x > 0], hard_label = w·[z >= 0.5].
// The loss (Python side) is a function of these sums, so by the chain rule
//   dL/dx = w·(g_ce·ce' + g_inter·z·p(1-p) + g_pred·k·p^(k-1)·p(1-p))
// with g_ce, g_inter, g_pred the upstream gradients of ce_sum, intersection and pred_sum
// (the other columns do not depend on x, or only through a step function).
// With the focal options (gamma, alpha) the ce_sum term is w·a_t·(1-p_t)^gamma·ce and
// ce' becomes its derivative (segloss_focal_math.h); every other column is unchanged.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FSL_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define FSL_HD inline __attribute__((always_inline))
#endif

namespace fused_segloss {

// Columns of the [B, C, 8] statistics tensor (the sums listed at the top of this file).
enum StatColumn : int {
  kCeSum = 0,
  kWeightSum = 1,
  kIntersection = 2,
  kPredSum = 3,
  kLabelSum = 4,
  kHardTp = 5,
  kHardPred = 6,
  kHardLabel = 7,
  kNumStats = 8,
};

// ---------------------------------------------------------------------------
// Bit casts (memcpy on the host: defined behaviour, and the vectoriser sees a move).
FSL_HD int32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(f);
#else
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
#endif
}
FSL_HD float BitsToFloat(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
#endif
}

// ---------------------------------------------------------------------------
// Scalar primitives (VecF overloads live in simd.h).

// a·b + c, fused where the hardware has FMA (one rounding, and one instruction instead of
// two in the polynomials below), plain otherwise.
FSL_HD float MulAdd(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
FSL_HD double MulAdd(double a, double b, double c) { return a * b + c; }

// c ? a : b, evaluated as a select (both sides are computed, no branch).
template <typename T>
FSL_HD T Select(bool c, T a, T b) { return c ? a : b; }

template <typename T>
FSL_HD T Abs(T x) { return x < T(0) ? -x : x; }

// a > b ? a : b: when either is NaN the result is b (the x86 max instruction's rule, which
// the vector overload uses), so Max(bound, t) keeps a NaN t.
template <typename T>
FSL_HD T Max(T a, T b) { return a > b ? a : b; }

FSL_HD float Reciprocal(float d) { return 1.0f / d; }
FSL_HD double Reciprocal(double d) { return 1.0 / d; }

// v·2^n for an integer n in [-126, 127], given both as a float (n) and as an int (n_int):
// 2^n built in the exponent bits. The AVX-512 vector overload (simd.h) is one vscalefps on
// n instead of the shift and multiply (the same result in fewer instructions).
template <typename T, typename I>
FSL_HD T ScaleByPowerOfTwo(T v, T /*n*/, I n_int) {
  return v * BitsToFloat((n_int + 127) << 23);
}

// exp(t) for t <= 0 in float32 arithmetic (float or a float vector), branch-free.
// Cody–Waite reduction t = n·ln2 + r with |r| <= ln2/2, a degree-5 polynomial for e^r, and
// 2^n built in the exponent bits. The polynomial is 1 + r + c2·r² + ... + c5·r⁵ with c2..c5
// fitted minimax to the relative error on |r| <= ln2/2 (linear program on 4000 Chebyshev
// nodes; 1.0e-7 in exact arithmetic, 1.2e-7 with the coefficients rounded to float32).
// Over every float32 t in [-87, 0]: max relative error 2.3e-7 (2 ulp), close to a
// degree-7 Taylor polynomial's 1.7e-7 with four fewer multiply-adds per vector (the
// multiply-add pipes bind both passes).
// t is clamped at -87 so 2^n stays a normal float; exp(-87) = 1.6e-38 is indistinguishable
// from 0 in every use below. NaN passes through (the clamp compares false, the polynomial
// stays NaN).
template <typename T>
FSL_HD T ExpNonPositive(T t) {
  t = Max(T(-87.0f), t);
  const float kMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const T shifted = MulAdd(t, T(1.44269504088896341f), T(kMagic));
  const T n = shifted - T(kMagic);
  const auto n_int = FloatBits(shifted) - FloatBits(kMagic);
  // ln2 split so that n·kLn2Hi is exact for |n| < 2^10.
  const T r = MulAdd(n, T(-1.428606765330187e-06f), MulAdd(n, T(-0.693145751953125f), t));
  // Estrin's scheme: shorter dependency chains than Horner's.
  const T r2 = r * r;
  const T p01 = r + T(1.0f), p23 = MulAdd(r, T(0.16667261719703674f), T(0.4999926686286926f));
  const T p45 = MulAdd(r, T(0.008300540037453175f), T(0.04188753291964531f));
  const T poly = MulAdd(r2, MulAdd(r2, p45, p23), p01);
  return ScaleByPowerOfTwo(poly, n, n_int);
}

// log1p(e) for e in [0, 1] in float32 arithmetic, branch-free and division-free: e·P(e)
// where P is a degree-8 polynomial fitted (Chebyshev nodes) to log1p(e)/e on [0, 1].
// Max relative error in float32 arithmetic over [0, 1]: 2.2e-7 (under 2 ulp), exact as e -> 0.
template <typename T>
FSL_HD T Log1pUnit(T e) {
  // Coefficients c0..c8 of P, evaluated with Estrin's scheme.
  const T e2 = e * e, e4 = e2 * e2;
  const T q01 = MulAdd(e, T(-0.49999502301216125f), T(1.0f));
  const T q23 = MulAdd(e, T(-0.24844369292259216f), T(0.33319270610809326f));
  const T q45 = MulAdd(e, T(-0.13674770295619965f), T(0.19111430644989014f));
  const T q67 = MulAdd(e, T(-0.02958850748836994f), T(0.07836166769266129f));
  const T q8(0.005253457929939032f);
  const T poly = MulAdd(e4, MulAdd(e4, q8, MulAdd(e2, q67, q45)), MulAdd(e2, q23, q01));
  return e * poly;
}

// A sum of log1p(e_i) over a run of elements with one log for the run instead of one per
// element (the CPU forward, where every element's log term has weight 1). With D_0 = 0 and
//   D_k = (1 + D_{k-1})·(1 + e_k) - 1 = D_{k-1} + e_k + D_{k-1}·e_k,
// 1 + D_n is the product of the (1 + e_i), so their log1p sum is log1p(D_n) (Log1pWide).
// D is kept instead of the product so that tiny e still count: where 1 + e rounds to 1
// (e < 2^-24: confident, correct predictions, the bulk of a trained model's pixels) the
// product would lose them all, while each step here rounds D relative to D itself (two
// roundings: relative error at most 2n·2^-24 after n steps, the order of the float32 sum
// of n terms it replaces). e <= 1, so 1 + D_n <= 2^n: finite in float32 for n <= 127.
template <typename T>
FSL_HD T Log1pProductStep(T d, T e) { return MulAdd(d, e, d + e); }

// log1p(d) for d in [0, 2^127) in float32 arithmetic (the runs above). 1 + d = 2^k·m with
// m in [1, 2) read from the bits, log(1 + d) = k·ln2 + log1p(m - 1) (m - 1 is exact and in
// Log1pUnit's [0, 1)), plus the rounding of 1 + d itself, log(1 + c/u) ~ c/u with
// c = d - (u - 1) (exact for u < 2, where it matters): tiny d stay exact. A NaN d gives NaN
// (c is NaN).
FSL_HD float IntToFloat(int32_t i) { return static_cast<float>(i); }
template <typename T>
FSL_HD T Log1pWide(T d) {
  const T u = T(1.0f) + d;
  const auto bits = FloatBits(u);
  const auto exponent = (bits >> 23) - 127;  // u >= 1: normal and positive
  const T mantissa_minus_1 = BitsToFloat((bits & 0x007fffff) | 0x3f800000) - T(1.0f);
  const T rounding = (d - (u - T(1.0f))) * Reciprocal(u);
  return MulAdd(IntToFloat(exponent), T(0.693147180559945309f), Log1pUnit(mantissa_minus_1)) +
         rounding;
}
// float64 inputs are computed in float64 with the library functions (accuracy over speed);
// these non-template overloads win over the templates above for double.
FSL_HD double ExpNonPositive(double t) { return exp(t); }
FSL_HD double Log1pUnit(double e) { return log1p(e); }

// ---------------------------------------------------------------------------
// The shared intermediates of one element.
template <typename T>
struct SigmoidParts {
  T e;        // exp(-|x|)
  T p;        // sigmoid(x)
  T one_m_p;  // 1 - sigmoid(x), computed without cancellation
  T p_1mp;    // p·(1-p) = e/(1+e)^2
};

// e = exp(-|x|): the first half of every element's dependency chain.
template <typename T>
FSL_HD T ExpOfNegativeAbs(T x) { return ExpNonPositive(-Abs(x)); }

// The parts from x and e = ExpOfNegativeAbs(x) (which the CPU forward computes one vector
// ahead, see AccumulateBlock).
template <typename T>
FSL_HD SigmoidParts<T> ComputeSigmoidParts(T x, T e) {
  SigmoidParts<T> s;
  s.e = e;
  const T inv = Reciprocal(T(1) + s.e);
  const T e_inv = s.e * inv;
  // x >= 0 is false for NaN, so NaN flows into p through e.
  const auto non_negative = x >= T(0);
  s.p = Select(non_negative, inv, e_inv);
  s.one_m_p = Select(non_negative, e_inv, inv);
  s.p_1mp = e_inv * inv;
  return s;
}

template <typename T>
FSL_HD SigmoidParts<T> ComputeSigmoidParts(T x) {
  return ComputeSigmoidParts(x, ExpOfNegativeAbs(x));
}
}  // namespace fused_segloss

#include "segloss_focal_math.h"  // the focal factor of ce_sum (uses the primitives above)

namespace fused_segloss {

// The pos_weight of a call that gave none (every class 1), as a type: the CPU forward pass
// is instantiated for it and takes the short cross-entropy below.
struct UnitPosWeight {};

// ce from positive_part = max(x, 0) and l = log1p(e): softplus(x) = max(x, 0) + l and
// softplus(-x) = max(-x, 0) + l, where max(-x, 0) is max(x, 0) - x exactly (one of the two
// terms is 0).
template <typename T>
FSL_HD T CrossEntropy(T x, T z, T pos_weight, T positive_part, T log_term) {
  const T softplus_pos = positive_part + log_term;
  const T softplus_neg = (positive_part - x) + log_term;
  return pos_weight * z * softplus_neg + (T(1) - z) * softplus_pos;
}

// pw = 1: ce = z·softplus(-x) + (1-z)·softplus(x) = (max(x, 0) - z·x) + l, since
// z·(max(x, 0) - x) + (1-z)·max(x, 0) = max(x, 0) - z·x. That difference equals
// (1-z)·max(x, 0) + z·max(-x, 0), a sum of non-negative terms, so its one rounding (a fused
// multiply-add) loses nothing; for labels 0 and 1 it is exact, and ce is bit for bit the
// general form's. 3 vector operations instead of 8.
template <typename T>
FSL_HD T CrossEntropyExceptLog(T x, T z, T positive_part) {
  return MulAdd(-z, x, positive_part);
}
template <typename T>
FSL_HD T CrossEntropy(T x, T z, UnitPosWeight, T positive_part, T log_term) {
  return CrossEntropyExceptLog(x, z, positive_part) + log_term;
}

// The hard counts' thresholds: the prediction is positive when x > 0 (p > 0.5), the label
// when z >= 0.5 (masks for vectors, bools for scalars).
template <typename T>
FSL_HD auto PredictedPositive(T x) { return x > T(0); }
template <typename T>
FSL_HD auto LabelPositive(T z) { return z >= T(0.5f); }

// The eight statistics contributions of one element (the sums at the top of this file,
// in StatColumn order). PosWeight is T
// (the class's pos_weight) or UnitPosWeight. kLogDeferred (UnitPosWeight and w = 1 only):
// out[kCeSum] leaves out the log term log1p(e), and *deferred_e gets e, for the caller to
// sum as Log1pProductStep runs. e = ExpOfNegativeAbs(x) (ForwardTerms below computes it).
// Focal is NoFocal (plain ce) or FocalParams<T> (ce times segloss_focal_math.h's factor).
template <typename T, bool kSquared, typename PosWeight, bool kLogDeferred = false,
          typename Focal = NoFocal>
FSL_HD void ForwardTermsGivenExp(T x, T e, T z, T w, PosWeight pos_weight,
                                 T out[kNumStats], T* deferred_e = nullptr,
                                 Focal focal = Focal{}) {
  const SigmoidParts<T> s = ComputeSigmoidParts(x, e);
  const T zero(0);
  T ce;
  if constexpr (kLogDeferred) {
    static_assert(std::is_same_v<PosWeight, UnitPosWeight>, "the log term must have weight 1");
    ce = CrossEntropyExceptLog(x, z, Max(x, zero));
    *deferred_e = s.e;
  } else {
    const T log_term = Log1pUnit(s.e);
    ce = CrossEntropy(x, z, pos_weight, Max(x, zero), log_term);
    if constexpr (!std::is_same_v<Focal, NoFocal>) {
      static_assert(!kLogDeferred, "the focal factor needs the whole ce");
      ce = ComputeFocalParts(x, z, s, log_term, focal).factor * ce;
    }
  }
  const auto pred_hard = PredictedPositive(x);
  const auto label_hard = LabelPositive(z);
  const T wz = w * z;
  out[kCeSum] = w * ce;
  out[kWeightSum] = w;
  out[kIntersection] = wz * s.p;
  out[kPredSum] = kSquared ? w * s.p * s.p : w * s.p;
  out[kLabelSum] = kSquared ? wz * z : wz;
  out[kHardTp] = Select(pred_hard & label_hard, w, zero);
  out[kHardPred] = Select(pred_hard, w, zero);
  out[kHardLabel] = Select(label_hard, w, zero);
}

template <typename T, bool kSquared, typename PosWeight, bool kLogDeferred = false,
          typename Focal = NoFocal>
FSL_HD void ForwardTerms(T x, T z, T w, PosWeight pos_weight, T out[kNumStats],
                         T* deferred_e = nullptr, Focal focal = Focal{}) {
  ForwardTermsGivenExp<T, kSquared, PosWeight, kLogDeferred, Focal>(
      x, ExpOfNegativeAbs(x), z, w, pos_weight, out, deferred_e, focal);
}

// dL/dx of one element given the upstream gradients of the differentiable columns
// (the chain rule at the top of this file): g_ce = dL/d ce_sum, g_inter = dL/d intersection, g_pred = dL/d pred_sum.
//   d(w·ce)/dx      = w·ce'
//   d(w·p·z)/dx     = w·z·p(1-p)
//   d(w·p^k)/dx     = w·k·p^(k-1)·p(1-p)
// e = ExpOfNegativeAbs(x) (LogitGradient below computes it). With FocalParams, w·ce' is
// the focal cross-entropy's (segloss_focal_math.h).
template <typename T, bool kSquared, typename Focal = NoFocal>
FSL_HD T LogitGradientGivenExp(T x, T e, T z, T w, T pos_weight, T g_ce, T g_inter,
                               T g_pred, Focal focal = Focal{}) {
  const SigmoidParts<T> s = ComputeSigmoidParts(x, e);
  T ce_grad = (T(1) - z) * s.p - pos_weight * z * s.one_m_p;
  if constexpr (!std::is_same_v<Focal, NoFocal>) {
    const T log_term = Log1pUnit(s.e);
    const T ce = CrossEntropy(x, z, pos_weight, Max(x, T(0)), log_term);
    ce_grad = FocalCrossEntropyGradient(x, z, s, log_term, ce, ce_grad, focal);
  }
  const T pred_grad = kSquared ? T(2) * s.p * s.p_1mp : s.p_1mp;
  return w * (g_ce * ce_grad + g_inter * z * s.p_1mp + g_pred * pred_grad);
}

template <typename T, bool kSquared, typename Focal = NoFocal>
FSL_HD T LogitGradient(T x, T z, T w, T pos_weight, T g_ce, T g_inter, T g_pred,
                       Focal focal = Focal{}) {
  return LogitGradientGivenExp<T, kSquared, Focal>(x, ExpOfNegativeAbs(x), z, w, pos_weight,
                                                   g_ce, g_inter, g_pred, focal);
}

// A label is valid when 0 <= z <= 1 (NaN is invalid); a weight when 0 <= w < inf.
// (Written with & so that vector masks work too.)
// 0 <= z <= 1 exactly when z - z^2 = z(1 - z) >= 0: for z in [0, 1] the exact value is
// >= 0 and rounding keeps it so (z^2 <= z); outside it is negative by at least |z| or
// 2^-23, so no rounding reaches 0; NaN and +-inf give NaN or -inf. One fused op and a
// compare instead of two compares and an and.
template <typename T>
FSL_HD auto LabelIsValid(T z) { return MulAdd(-z, z, z) >= T(0); }
template <typename T>
FSL_HD auto WeightIsValid(T w) { return (w >= T(0)) & (w <= T(3.0e38f)); }

// ---------------------------------------------------------------------------
// Index math (int64 throughout). The logits are viewed as [B, N, C]
// (channels_last) or [B, C, N] (channels_first), N = product of spatial dims.
// Weights are viewed the same way with every axis either 1 (broadcast) or full;
// a broadcast axis has stride 0.
struct ProblemShape {
  int64_t batch = 0;
  int64_t positions = 0;  // N
  int64_t classes = 0;    // C
  bool channels_last = true;
};

struct WeightStrides {
  int64_t batch = 0, position = 0, klass = 0;
};

FSL_HD int64_t ElementIndex(const ProblemShape& s, int64_t b, int64_t n, int64_t c) {
  return s.channels_last ? (b * s.positions + n) * s.classes + c
                         : (b * s.classes + c) * s.positions + n;
}

// Strides of a canonical weight view whose dims are each 1 or full.
FSL_HD WeightStrides MakeWeightStrides(const ProblemShape& s, int64_t w_batch,
                                       int64_t w_positions, int64_t w_classes) {
  WeightStrides st;
  if (s.channels_last) {  // [Bw, Nw, Cw]
    st.klass = w_classes == 1 ? 0 : 1;
    st.position = w_positions == 1 ? 0 : w_classes;
    st.batch = w_batch == 1 ? 0 : w_positions * w_classes;
  } else {  // [Bw, Cw, Nw]
    st.position = w_positions == 1 ? 0 : 1;
    st.klass = w_classes == 1 ? 0 : w_positions;
    st.batch = w_batch == 1 ? 0 : w_classes * w_positions;
  }
  return st;
}

FSL_HD int64_t WeightIndex(const WeightStrides& st, int64_t b, int64_t n, int64_t c) {
  return b * st.batch + n * st.position + c * st.klass;
}

}  // namespace fused_segloss

// Softmax mode (one class per pixel): its per-pixel terms, from the primitives above.
#include "segloss_softmax_math.h"
