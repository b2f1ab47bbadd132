// A minimal fixed-width float vector for the CPU kernels (host only, never CUDA).
//
// VecF<kParts> wraps GCC/Clang vector extensions so that the generic per-element math in
// segloss_math.h (written once, with Select/Abs/Max/MulAdd/Reciprocal instead of `?:`,
// fabs, fmaf and `/`) runs on many elements at a time with exactly the same formula as the
// scalar code of the CUDA kernels. A VecF<kParts> is kParts hardware vectors (AVX-512: 16
// lanes, AVX/AVX2: 8, else 4 with plain vector extensions that GCC lowers to SSE/NEON or
// scalar code), and every operation is issued for all parts back to back.
//
// Why parts: one vector's exp -> reciprocal -> gradient chain has far more latency than
// instructions, more than the out-of-order scheduler overlaps on its own; two interleaved
// chains keep the FP pipes busier. The gradient uses 2 parts; the forward uses 2 with
// AVX-512 (32 registers) and 1 with AVX2 (16 registers, which its accumulators need).
// Why not auto-vectorisation: the compiler keeps the 8 accumulator columns in memory and
// compiles 1/(1+e) to a full-latency division.
#pragma once

#if defined(__CUDACC__)
#error "simd.h is for host code only"
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX512F__)
// GCC 12's intrinsics initialise their "undefined" operands as `__m512 __Y = __Y;`, which
// -Wall reports wherever such an intrinsic is inlined into our code (GCC bug 105593, fixed
// in GCC 13). The warning's location is that line of the header, so it is silenced there.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

namespace fused_segloss {

#if defined(__AVX512F__)
constexpr int kHardwareLanes = 16;
#elif defined(__AVX__)
constexpr int kHardwareLanes = 8;
#else
constexpr int kHardwareLanes = 4;
#endif

typedef float HwF __attribute__((vector_size(kHardwareLanes * 4)));
typedef int32_t HwI __attribute__((vector_size(kHardwareLanes * 4)));

inline HwI AsInt(HwF f) { return reinterpret_cast<HwI>(f); }
inline HwF AsFloat(HwI i) { return reinterpret_cast<HwF>(i); }

// a > b ? a : b per lane; b where either is NaN (as the scalar Max in segloss_math.h).
inline HwF MaxHw(HwF a, HwF b) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, b);
#elif defined(__AVX__)
  return _mm256_max_ps(a, b);
#else
  const HwI a_wins = a > b;
  return AsFloat((a_wins & AsInt(a)) | (~a_wins & AsInt(b)));
#endif
}

inline HwF MulAddHw(HwF a, HwF b, HwF c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// 1/d for d in [1, 2] (1/(1+e); also Log1pWide's small correction, d >= 1). The hardware
// estimate (relative error 2^-14 with AVX-512, 1.5·2^-12 with AVX; any normal d) refined by
// one Newton step r' = r + r(1 - d r), which squares the error (over every float in [1, 2]
// with AVX2: max relative error 1.5e-7, 1.3 ulp), instead of a long-latency division.
// NaN stays NaN.
inline HwF ReciprocalHw(HwF d) {
#if defined(__AVX512F__) || defined(__AVX__)
#if defined(__AVX512F__)
  const HwF r = _mm512_rcp14_ps(d);
#else
  const HwF r = _mm256_rcp_ps(d);
#endif
  return MulAddHw(r, MulAddHw(-d, r, HwF{} + 1.0f), r);
#else
  return 1.0f / d;
#endif
}

// Applies `expr` (in terms of part index i) to every part.
#define FSL_PARTS(Result, expr)                      \
  Result r;                                          \
  for (int i = 0; i < kParts; ++i) r.part[i] = expr; \
  return r

// Per-lane masks. With AVX-512 they live in mask registers, one bit per lane: comparisons
// produce them and blends and masked adds consume them. As vectors (how GCC represents the
// comparisons of vector extensions) each use cost a move into a vector register, and a
// masked add a test back into a mask register; with mask registers the forward's inner
// loop is shorter, and the sums are the same bit for bit. Elsewhere a mask is a vector of
// all-ones or all-zeros lanes.
#if defined(__AVX512F__)
typedef __mmask16 HwMask;
inline HwMask LessHw(HwF a, HwF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline HwMask LessEqualHw(HwF a, HwF b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
inline HwF BlendHw(HwMask c, HwF a, HwF b) {  // c ? a : b
  return reinterpret_cast<HwF>(
      _mm512_mask_blend_ps(c, reinterpret_cast<__m512>(b), reinterpret_cast<__m512>(a)));
}
inline HwF AddWhereHw(HwMask m, HwF a, HwF b) {  // m ? a + b : a
  return reinterpret_cast<HwF>(_mm512_mask_add_ps(
      reinterpret_cast<__m512>(a), m, reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
}
inline HwMask NotHw(HwMask m) { return static_cast<HwMask>(~m); }
inline HwMask FirstLanesHw(int count) {  // lanes [0, count) of this hardware vector
  const int n = count < 0 ? 0 : (count > kHardwareLanes ? kHardwareLanes : count);
  return static_cast<HwMask>((1u << n) - 1u);
}
inline bool AnyHw(HwMask m) { return m != 0; }
#else
typedef HwI HwMask;
inline HwMask LessHw(HwF a, HwF b) { return a < b; }
inline HwMask LessEqualHw(HwF a, HwF b) { return a <= b; }
inline HwF BlendHw(HwMask c, HwF a, HwF b) {  // a bitwise blend: c ? a : b
  return AsFloat((c & AsInt(a)) | (~c & AsInt(b)));
}
// a - (m ? -b : +0): subtracting +0 leaves every a as it is, -0 included (adding +0 would
// turn -0 into +0), and a - (-b) is a + b exactly. (-b is hoisted where b is constant.)
inline HwF AddWhereHw(HwMask m, HwF a, HwF b) { return a - AsFloat(m & AsInt(-b)); }
inline HwMask NotHw(HwMask m) { return ~m; }
inline HwMask FirstLanesHw(int count) {
  HwI index;
  for (int i = 0; i < kHardwareLanes; ++i) index[i] = i;
  return index < count;
}
inline bool AnyHw(HwMask m) {
  for (int i = 0; i < kHardwareLanes; ++i) {
    if (m[i] != 0) return true;
  }
  return false;
}
#endif

template <int kParts>
struct VecMask {  // one HwMask per part
  HwMask part[kParts];
};

template <int kParts>
struct VecI {
  HwI part[kParts];
  VecI() = default;
  VecI(int32_t s) {  // broadcast, like a scalar literal
    for (int i = 0; i < kParts; ++i) part[i] = HwI{} + s;
  }
};

template <int kParts>
struct VecF {
  static constexpr int kLanes = kParts * kHardwareLanes;
  HwF part[kParts];
  VecF() = default;
  VecF(float s) {  // broadcast, like a scalar literal
    for (int i = 0; i < kParts; ++i) part[i] = HwF{} + s;
  }
  static VecF Load(const float* p) {
    VecF r;
    std::memcpy(&r.part, p, sizeof(r.part));
    return r;
  }
  void Store(float* p) const { std::memcpy(p, &part, sizeof(part)); }
};

#define FSL_VEC_BINARY(Result, Type, op)                           \
  template <int kParts>                                            \
  inline Result<kParts> operator op(Type<kParts> a, Type<kParts> b) { \
    FSL_PARTS(Result<kParts>, a.part[i] op b.part[i]);             \
  }
FSL_VEC_BINARY(VecF, VecF, +)
FSL_VEC_BINARY(VecF, VecF, -)
FSL_VEC_BINARY(VecF, VecF, *)
FSL_VEC_BINARY(VecMask, VecMask, &)
FSL_VEC_BINARY(VecMask, VecMask, |)
FSL_VEC_BINARY(VecI, VecI, +)
FSL_VEC_BINARY(VecI, VecI, -)
#undef FSL_VEC_BINARY

// Comparisons: false where either side is NaN (ordered), as the scalar operators.
template <int kParts>
inline VecMask<kParts> operator<(VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecMask<kParts>, LessHw(a.part[i], b.part[i]));
}
template <int kParts>
inline VecMask<kParts> operator<=(VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecMask<kParts>, LessEqualHw(a.part[i], b.part[i]));
}
template <int kParts>
inline VecMask<kParts> operator>(VecF<kParts> a, VecF<kParts> b) { return b < a; }
template <int kParts>
inline VecMask<kParts> operator>=(VecF<kParts> a, VecF<kParts> b) { return b <= a; }

// Mixed vector/scalar forms used by the generic math (the scalar is broadcast).
template <int kParts>
inline VecI<kParts> operator-(VecI<kParts> a, int32_t b) { return a - VecI<kParts>(b); }
template <int kParts>
inline VecI<kParts> operator+(VecI<kParts> a, int32_t b) { return a + VecI<kParts>(b); }
template <int kParts>
inline VecI<kParts> operator<<(VecI<kParts> a, int s) { FSL_PARTS(VecI<kParts>, a.part[i] << s); }
template <int kParts>
inline VecI<kParts> operator>>(VecI<kParts> a, int s) { FSL_PARTS(VecI<kParts>, a.part[i] >> s); }
template <int kParts>
inline VecI<kParts> operator&(VecI<kParts> a, int32_t b) { FSL_PARTS(VecI<kParts>, a.part[i] & b); }
template <int kParts>
inline VecI<kParts> operator|(VecI<kParts> a, int32_t b) { FSL_PARTS(VecI<kParts>, a.part[i] | b); }
template <int kParts>
inline VecF<kParts> IntToFloat(VecI<kParts> v) {
  FSL_PARTS(VecF<kParts>, __builtin_convertvector(v.part[i], HwF));
}
template <int kParts>
inline VecF<kParts> operator-(VecF<kParts> a) { FSL_PARTS(VecF<kParts>, -a.part[i]); }
template <int kParts>
inline VecF<kParts>& operator+=(VecF<kParts>& a, VecF<kParts> b) { return a = a + b; }

template <int kParts>
inline VecMask<kParts> Not(VecMask<kParts> m) { FSL_PARTS(VecMask<kParts>, NotHw(m.part[i])); }
inline bool Not(bool b) { return !b; }

template <int kParts>
inline VecI<kParts> FloatBits(VecF<kParts> f) { FSL_PARTS(VecI<kParts>, AsInt(f.part[i])); }
template <int kParts>
inline VecF<kParts> BitsToFloat(VecI<kParts> v) { FSL_PARTS(VecF<kParts>, AsFloat(v.part[i])); }

// Lane-wise c ? a : b (a blend; a NaN in the unselected operand does not leak).
template <int kParts>
inline VecF<kParts> Select(VecMask<kParts> c, VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecF<kParts>, BlendHw(c.part[i], a.part[i], b.part[i]));
}
template <int kParts>
inline VecF<kParts> Abs(VecF<kParts> x) {
  FSL_PARTS(VecF<kParts>, AsFloat(AsInt(x.part[i]) & 0x7fffffff));
}
template <int kParts>
inline VecF<kParts> Max(VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecF<kParts>, MaxHw(a.part[i], b.part[i]));
}
template <int kParts>
inline VecF<kParts> MulAdd(VecF<kParts> a, VecF<kParts> b, VecF<kParts> c) {
  FSL_PARTS(VecF<kParts>, MulAddHw(a.part[i], b.part[i], c.part[i]));
}
template <int kParts>
inline VecF<kParts> Reciprocal(VecF<kParts> d) {
  FSL_PARTS(VecF<kParts>, ReciprocalHw(d.part[i]));
}
// m ? a + b : a per lane: one masked add with AVX-512 (the compiler turns a blend of
// a + b and a, or a + (m ? b : 0), into two or three instructions).
template <int kParts>
inline VecF<kParts> AddWhere(VecMask<kParts> m, VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecF<kParts>, AddWhereHw(m.part[i], a.part[i], b.part[i]));
}
inline double AddWhere(bool m, double a, double b) { return m ? a + b : a; }

#if defined(__AVX512F__)
// v·2^n for integral n (segloss_math.h's ScaleByPowerOfTwo): vscalefps, exact like the
// generic exponent-bits version.
template <int kParts>
inline VecF<kParts> ScaleByPowerOfTwo(VecF<kParts> v, VecF<kParts> n, VecI<kParts> /*n_int*/) {
  FSL_PARTS(VecF<kParts>, reinterpret_cast<HwF>(_mm512_scalef_ps(
                              reinterpret_cast<__m512>(v.part[i]),
                              reinterpret_cast<__m512>(n.part[i]))));
}
#endif

#undef FSL_PARTS

}  // namespace fused_segloss
