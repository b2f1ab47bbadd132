// The per-pixel math of softmax mode (activation = softmax: one class per pixel), in one
// place for the CPU and CUDA kernels (and so the XLA FFI handlers, which call them).
// Included by segloss_math.h after its primitives; the same templates run on scalars
// (float on CUDA, double anywhere) and on the CPU's SIMD vectors (simd.h).
//
// Notation, per pixel with logits x_0..x_{C-1}, labels z_c (dense, or z_c = [c = y] for a
// sparse class id y), element weights w_c (w_c = 0 for every c where y = ignore_index),
// k = 2 if squared else 1, gamma >= 0 the focal exponent:
//   m = max_c x_c,  a = argmax_c x_c (the lowest index on ties, as tf.argmax)
//   s = Σ_c exp(x_c - m)  (>= 1: the max contributes exp(0)),  p_c = exp(x_c - m) / s
//   -log p_c = log s - (x_c - m)         (never log of a rounded p_c)
//   f_c = (1 - p_c)^gamma                (1 when gamma = 0)
// The statistics of (image b, class c) are sums over that image's pixels of
//   ce_sum = w·z·f·(-log p), weight_sum = w·z, intersection = w·z·p, pred_sum = w·p^k,
//   label_sum = w·z^k, hard_tp = w·[a = c]·[z >= 0.5], hard_pred = w·[a = c],
//   hard_label = w·[z >= 0.5].
// Gradient. With G_c = g_ce_c·w_c·z_c and the chain rule through dp_c/dx_j = p_c(δ_cj - p_j),
//   dL/dx_j = u_j - p_j·Σ_c u_c,   u_c = h_c + a_c·p_c,
//   h_c = -G_c·f_c·(1 + gamma·p_c·r_c),  r_c = (-log p_c)/(1 - p_c)  (limit 1 as p_c -> 1),
//   a_c = w_c·(g_inter_c·z_c + g_pred_c·k·p_c^(k-1)),
// because d[(1-p)^gamma·(-log p)]/dp · p = -(1-p)^gamma·(1 + gamma·p·(-log p)/(1-p)).
// With gamma = 0, h_c = -G_c and this is p_j·Σ_c G_c - G_j + p_j·(a_j - Σ_c a_c·p_c).
// One pass over the pixel's logits gives m, a and s (SoftmaxNormalise); the per-class
// terms then need only x_c (or exp(x_c - m), which a kernel may keep from that pass).
#pragma once

namespace fused_segloss {

enum class Activation : int { kSigmoid = 0, kSoftmax = 1 };

// log1p(d) for float64 (the float32 template in segloss_math.h works on the bits).
FSL_HD double Log1pWide(double d) { return log1p(d); }

// The pixel's normaliser: m, a (as a T holding the class index, exact for C < 2^24),
// log s and 1/s.
template <typename T>
struct SoftmaxPixel {
  T max;
  T argmax;
  T log_sum;
  T inv_sum;
};

// load(c) returns x_c as a T; keep(c, e) receives each e_c = exp(x_c - m) as it is summed
// (a kernel may store them for SoftmaxClassGivenExp instead of computing them again).
// NaN logits make s, and so every term, NaN (exp(NaN) is NaN), so they propagate instead
// of being skipped by the max.
template <typename T, typename LoadLogit, typename KeepExp>
FSL_HD SoftmaxPixel<T> SoftmaxNormaliseKeepingExp(int64_t classes, LoadLogit&& load,
                                                  KeepExp&& keep) {
  SoftmaxPixel<T> px;
  px.max = load(0);
  px.argmax = T(0.0f);
  for (int64_t c = 1; c < classes; ++c) {
    const T x = load(c);
    const auto greater = x > px.max;  // strict: the lowest index wins a tie
    px.argmax = Select(greater, T(static_cast<float>(c)), px.argmax);
    px.max = Select(greater, x, px.max);
  }
  T sum(0.0f);
  for (int64_t c = 0; c < classes; ++c) {
    const T e = ExpNonPositive(load(c) - px.max);
    keep(c, e);
    sum += e;
  }
  // s - 1 is exact for s <= 2 (Sterbenz), where log s is small and that matters.
  px.log_sum = Log1pWide(sum - T(1.0f));
  px.inv_sum = Reciprocal(sum);
  return px;
}

// The keep of SoftmaxNormalise: the exponentials are not kept.
struct SoftmaxDiscardExp {
  template <typename T>
  FSL_HD void operator()(int64_t, const T&) const {}
};

template <typename T, typename LoadLogit>
FSL_HD SoftmaxPixel<T> SoftmaxNormalise(int64_t classes, LoadLogit&& load) {
  return SoftmaxNormaliseKeepingExp<T>(classes, load, SoftmaxDiscardExp{});
}

// p_c and -log p_c of one class, given e = exp(x - m) (ExpNonPositive(x - m)).
template <typename T>
struct SoftmaxClass {
  T p;
  T neg_log_p;
};

template <typename T>
FSL_HD SoftmaxClass<T> SoftmaxClassGivenExp(T x, T e, const SoftmaxPixel<T>& px) {
  SoftmaxClass<T> s;
  s.p = e * px.inv_sum;
  s.neg_log_p = px.log_sum - (x - px.max);
  return s;
}

template <typename T>
FSL_HD SoftmaxClass<T> SoftmaxClassParts(T x, const SoftmaxPixel<T>& px) {
  return SoftmaxClassGivenExp(x, ExpNonPositive(x - px.max), px);
}

// [a = c] as a mask (the class index c as a T; |a - c| < 1/2 is equality for integers).
template <typename T>
FSL_HD auto IsArgmax(const SoftmaxPixel<T>& px, T klass) {
  return Abs(px.argmax - klass) < T(0.5f);
}

// (1 - p)^gamma for gamma > 0: exp(gamma·log(1 - p)), log clamped at the smallest normal
// float so that p = 1 gives a factor of (nearly) 0, never NaN.
template <typename T>
FSL_HD T SoftmaxFocalFactor(T p, T gamma) {
  const T q = Max(T(1.17549435e-38f), T(1.0f) - p);
  return ExpNonPositive(gamma * LogNormalUnit(q));
}

// The eight statistics contributions of class c of one pixel (StatColumn order). `focal`
// is whether gamma > 0 (uniform over a kernel call; gamma = 0 takes the plain branch, so
// its results do not depend on the focal code). klass = c as a T.
template <typename T>
FSL_HD void SoftmaxForwardTerms(const SoftmaxClass<T>& cls, T z, T w, T klass,
                                const SoftmaxPixel<T>& px, bool squared, bool focal, T gamma,
                                T out[kNumStats]) {
  T ce = z * cls.neg_log_p;
  if (focal) ce = SoftmaxFocalFactor(cls.p, gamma) * ce;
  const auto pred_hard = IsArgmax(px, klass);
  const auto label_hard = LabelPositive(z);
  const T zero(0.0f);
  const T wz = w * z;
  out[kCeSum] = w * ce;
  out[kWeightSum] = wz;
  out[kIntersection] = wz * cls.p;
  out[kPredSum] = squared ? w * cls.p * cls.p : w * cls.p;
  out[kLabelSum] = squared ? wz * z : wz;
  out[kHardTp] = Select(pred_hard & label_hard, w, zero);
  out[kHardPred] = Select(pred_hard, w, zero);
  out[kHardLabel] = Select(label_hard, w, zero);
}

// u_c of the gradient (see the top of this file) from class c's own terms and upstream
// gradients g_ce, g_inter, g_pred (dL/d ce_sum, intersection, pred_sum of class c).
template <typename T>
FSL_HD T SoftmaxGradientTerm(const SoftmaxClass<T>& cls, T z, T w, T g_ce, T g_inter,
                             T g_pred, bool squared, bool focal, T gamma) {
  const T g = g_ce * w * z;
  T h = -g;
  if (focal) {
    const T q = T(1.0f) - cls.p;
    const T ratio = Select(q > T(0.0f), cls.neg_log_p * Reciprocal(Max(q, T(1e-30f))), T(1.0f));
    h = -g * SoftmaxFocalFactor(cls.p, gamma) * MulAdd(gamma * cls.p, ratio, T(1.0f));
  }
  const T pred_grad = squared ? T(2.0f) * cls.p : T(1.0f);
  const T a = w * MulAdd(g_inter, z, g_pred * pred_grad);
  return MulAdd(a, cls.p, h);
}

// dL/dx_j = u_j - p_j·Σ_c u_c.
template <typename T>
FSL_HD T SoftmaxLogitGradient(T u, T p, T u_sum) {
  return MulAdd(-p, u_sum, u);
}

}  // namespace fused_segloss
