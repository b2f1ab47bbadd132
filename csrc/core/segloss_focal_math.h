// The focal modulation of the cross-entropy column, per element (included by
// segloss_math.h after its primitives; ForwardTermsGivenExp and LogitGradientGivenExp use
// it only when a kernel selects the focal variant, so the plain path is untouched).
//
// Notation as in segloss_math.h (x, z, w, pw, e = exp(-|x|), l = log1p(e), p = sigmoid(x)),
// with gamma >= 0 and alpha in [0, 1] or none:
//   p_t = z·p + (1-z)(1-p),   a_t = z·alpha + (1-z)(1-alpha)   (a_t = 1 without alpha)
//   ce_sum term  = w·a_t·(1-p_t)^gamma·ce
//   its dL/dx    = w·a_t·(1-p_t)^gamma·[ce' - gamma·(2z-1)·r·ce],  r = p(1-p)/(1-p_t)
// which is the derivative of (1-p_t)^gamma·ce, since d(1-p_t)/dx = -(2z-1)·p(1-p) and
// gamma·(1-p_t)^(gamma-1)·p(1-p) = gamma·(1-p_t)^gamma·r.
//
// Stable forms. 1-p_t = z(1-p) + (1-z)p; with 1/(1+e) and e/(1+e) for p and 1-p,
//   1-p_t = m/(1+e),   m = (1-z) + z·e  (x >= 0),   m = z + (1-z)·e  (x < 0),
// so m lies in [e, 1] and never cancels, log(1-p_t) = log(m) - l, and
//   r = [e/(1+e)^2]·(1+e)/m = (e/(1+e))/m,   which is <= 1/(1+e) <= 1 because m >= e.
// (1-p_t)^gamma = exp(gamma·(log(m) - l)) with the exponent <= 0 (ExpNonPositive). Where m
// underflows to 0 (float64, |x| > 745 with a hard label on the correct side) r takes its
// limit 1/(1+e) and log(m) is clamped at the smallest normal float, so gamma = 0 still
// gives a factor of exactly 1 and never 0·inf.
#pragma once

namespace fused_segloss {

// The focal options as the kernels receive them: gamma >= 0 (0 with no alpha means plain
// cross-entropy); alpha in [0, 1], or negative for "no alpha" (a_t = 1).
struct FocalOptions {
  float gamma = 0.0f;
  float alpha = -1.0f;
};

FSL_HD bool FocalEnabled(const FocalOptions& o) { return o.gamma != 0.0f || o.alpha >= 0.0f; }

// The plain cross-entropy, as a type (the default of the per-element templates).
struct NoFocal {};

// The options in compute values: a_t = alpha_base + z·alpha_slope (1 and 0 without alpha,
// so that a_t is exactly 1 then).
template <typename T>
struct FocalParams {
  T gamma, alpha_base, alpha_slope;
};

template <typename T>
FSL_HD FocalParams<T> MakeFocalParams(const FocalOptions& o) {
  const bool has_alpha = o.alpha >= 0.0f;
  return {T(o.gamma), T(has_alpha ? 1.0f - o.alpha : 1.0f),
          T(has_alpha ? 2.0f * o.alpha - 1.0f : 0.0f)};
}

// NoFocal, or the parameters of `o` when kFocal (a kernel's compile-time variant).
template <typename T, bool kFocal>
FSL_HD auto FocalFor(const FocalOptions& o) {
  if constexpr (kFocal) {
    return MakeFocalParams<T>(o);
  } else {
    return NoFocal{};
  }
}

// log(u) for u in [2^-126, 1] in float32 arithmetic: u = 2^k·m with m in [1, 2) read from
// the bits, log(u) = k·ln2 + log1p(m - 1). Its absolute error (not relative) is what the
// focal factor needs: it is exponentiated, so it becomes a relative error of the factor.
template <typename T>
FSL_HD T LogNormalUnit(T u) {
  const auto bits = FloatBits(u);
  const auto exponent = (bits >> 23) - 127;
  const T mantissa_minus_1 = BitsToFloat((bits & 0x007fffff) | 0x3f800000) - T(1.0f);
  return MulAdd(IntToFloat(exponent), T(0.693147180559945309f), Log1pUnit(mantissa_minus_1));
}
FSL_HD double LogNormalUnit(double u) { return log(u); }

// a_t·(1-p_t)^gamma (the factor of ce) and r = p(1-p)/(1-p_t), from the element's
// sigmoid parts and l = log1p(e).
template <typename T>
struct FocalParts {
  T factor;
  T ratio;
};

template <typename T>
FSL_HD FocalParts<T> ComputeFocalParts(T x, T z, const SigmoidParts<T>& s, T log_term,
                                       const FocalParams<T>& f) {
  const T one_m_z = T(1) - z;
  const auto non_negative = x >= T(0);
  const T m = Select(non_negative, MulAdd(z, s.e, one_m_z), MulAdd(one_m_z, s.e, z));
  const T inv = Select(non_negative, s.p, s.one_m_p);    // 1/(1+e)
  const T e_inv = Select(non_negative, s.one_m_p, s.p);  // e/(1+e)
  const T log_m = LogNormalUnit(Max(m, T(1.17549435e-38f)));
  FocalParts<T> out;
  out.factor = MulAdd(z, f.alpha_slope, f.alpha_base) *
               ExpNonPositive(f.gamma * (log_m - log_term));
  out.ratio = Select(m > T(0), e_inv * Reciprocal(m), inv);
  return out;
}

// The focal cross-entropy's dx given ce' (ce_grad) and ce: a_t·(1-p_t)^gamma·[ce' -
// gamma·(2z-1)·r·ce].
template <typename T>
FSL_HD T FocalCrossEntropyGradient(T x, T z, const SigmoidParts<T>& s, T log_term, T ce,
                                   T ce_grad, const FocalParams<T>& f) {
  const FocalParts<T> parts = ComputeFocalParts(x, z, s, log_term, f);
  const T two_z_m_1 = MulAdd(T(2), z, T(-1));
  return parts.factor * (ce_grad - f.gamma * two_z_m_1 * parts.ratio * ce);
}

}  // namespace fused_segloss
