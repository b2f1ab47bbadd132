// A minimal fixed-width float vector for the CPU kernels (host only, never CUDA).
//
// VecF<kParts> wraps GCC/Clang vector extensions so that the generic per-element math in
// segloss_math.h (written once, with Select/Abs/Max/MulAdd/Reciprocal instead of `?:`,
// fabs, fmaf and `/`) runs on many elements at a time with exactly the same formula as the
// scalar code of the CUDA kernels. A VecF<kParts> is kParts hardware vectors (AVX-512: 16
// lanes, AVX/AVX2: 8, else 4 with plain vector extensions that GCC lowers to SSE/NEON or
// scalar code), and every operation is issued for all parts back to back.
//
// Why parts: one vector's exp -> reciprocal -> gradient chain is about 80 cycles of
// latency for about 40 instructions, more than the out-of-order scheduler overlaps on its
// own; two interleaved chains keep the FP pipes busier. The gradient uses 2 parts (in-cache
// 1.1 -> 0.9 ns per element on Zen 3); the forward uses 2 with AVX-512 and 1 with AVX2
// (its accumulators live in L1; with 16 registers 2 parts measured no faster on Zen 3).
// Why not auto-vectorisation: gcc kept the 8 accumulator columns in memory and compiled
// 1/(1+e) to a full-latency division (the old loop's hottest instruction).
#pragma once

#if defined(__CUDACC__)
#error "simd.h is for host code only"
#endif

#include <cstdint>
#include <cstring>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
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

// 1/d for d in [1, 2] (the only use: 1/(1+e)). The hardware estimate (relative error
// 2^-14 with AVX-512, 1.5·2^-12 with AVX) refined by one Newton step r' = r + r(1 - d r),
// which squares the error (measured over every float in [1, 2] with AVX2: max relative
// error 1.5e-7, 1.3 ulp) instead of a 10-14 cycle division. NaN stays NaN.
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

template <int kParts>
struct VecMask {  // all-ones or all-zeros per lane
  HwI part[kParts];
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
FSL_VEC_BINARY(VecMask, VecF, <)
FSL_VEC_BINARY(VecMask, VecF, <=)
FSL_VEC_BINARY(VecMask, VecF, >)
FSL_VEC_BINARY(VecMask, VecF, >=)
FSL_VEC_BINARY(VecMask, VecMask, &)
FSL_VEC_BINARY(VecMask, VecMask, |)
FSL_VEC_BINARY(VecI, VecI, +)
FSL_VEC_BINARY(VecI, VecI, -)
#undef FSL_VEC_BINARY

// Mixed vector/scalar forms used by the generic math (the scalar is broadcast).
template <int kParts>
inline VecI<kParts> operator-(VecI<kParts> a, int32_t b) { return a - VecI<kParts>(b); }
template <int kParts>
inline VecI<kParts> operator+(VecI<kParts> a, int32_t b) { return a + VecI<kParts>(b); }
template <int kParts>
inline VecI<kParts> operator<<(VecI<kParts> a, int s) { FSL_PARTS(VecI<kParts>, a.part[i] << s); }
template <int kParts>
inline VecF<kParts> operator-(VecF<kParts> a) { FSL_PARTS(VecF<kParts>, -a.part[i]); }
template <int kParts>
inline VecF<kParts>& operator+=(VecF<kParts>& a, VecF<kParts> b) { return a = a + b; }

template <int kParts>
inline VecMask<kParts> Not(VecMask<kParts> m) { FSL_PARTS(VecMask<kParts>, ~m.part[i]); }
inline bool Not(bool b) { return !b; }

template <int kParts>
inline VecI<kParts> FloatBits(VecF<kParts> f) { FSL_PARTS(VecI<kParts>, AsInt(f.part[i])); }
template <int kParts>
inline VecF<kParts> BitsToFloat(VecI<kParts> v) { FSL_PARTS(VecF<kParts>, AsFloat(v.part[i])); }

// Lane-wise c ? a : b (a bitwise blend; a NaN in the unselected operand does not leak).
template <int kParts>
inline VecF<kParts> Select(VecMask<kParts> c, VecF<kParts> a, VecF<kParts> b) {
  FSL_PARTS(VecF<kParts>,
            AsFloat((c.part[i] & AsInt(a.part[i])) | (~c.part[i] & AsInt(b.part[i]))));
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
