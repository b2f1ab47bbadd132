// Lane access for the CPU kernels: loading storage dtypes into compute vectors (with the
// conversion in registers), storing gradients back, partial vectors at row ends,
// folding float32 lane sums into float64, and the weight-map expansion RepeatEach. Host
// only; the per-element math these lanes feed is segloss_math.h's.
//
// The compute "vector" is VecF<kParts> (simd.h) for every logits dtype except float64,
// whose compute type is a plain double (one lane): the kernels are written once against
// `Lanes<Compute, kParts>` and the per-element templates of segloss_math.h.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "dtypes.h"
#include "segloss_math.h"
#include "simd.h"

namespace fused_segloss {

// The vector of a compute type: VecF<kParts> for float32, a plain double (one lane) for
// float64 (float64 inputs favour accuracy over speed).
template <typename Compute, int kParts>
struct Lanes;
template <int kParts>
struct Lanes<float, kParts> {
  using Vec = VecF<kParts>;
  static constexpr int kWidth = Vec::kLanes;
};
template <int kParts>
struct Lanes<double, kParts> {
  using Vec = double;
  static constexpr int kWidth = 1;
};

// ---------------------------------------------------------------------------------------
// Full loads: kWidth consecutive storage values converted to the compute vector. Each
// hardware part is loaded by a LoadHw overload; types without one convert lane by lane.
template <typename Storage>
inline double LoadVec(const Storage* p, double*) {
  return static_cast<double>(ToCompute(*p));
}

inline HwF LoadHw(const float* p) {
  HwF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 is the top half of a float32: widen the 16-bit lanes and shift; uint8 and bool
// (one byte, 0 or 1 for valid labels): widen to int32, then convert to float. With AVX2
// each widening is one zero-extending load (vpmovzxwd / vpmovzxbd), where the compiler
// turns the generic byte widening below into a lane-by-lane conversion.
#if defined(__AVX512F__)
// AVX-512: the same widenings at 16 lanes (vcvtph2ps, vpmovzxwd + vpslld, vpmovzxbd +
// vcvtdq2ps). Left to the compiler, the byte and float16 loads are converted lane by
// lane, which makes narrow inputs slower than float32 ones instead of faster.
inline HwF LoadHw(const Half* p) {  // exact for every half; ignores DAZ, like F16C
  const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<HwF>(_mm512_cvtph_ps(halves));
}
inline HwF LoadHw(const BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return AsFloat(reinterpret_cast<HwI>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
}
inline HwF LoadBytesHw(const void* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<HwF>(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)));
}
#elif defined(__AVX2__)
#if defined(__F16C__)
// float16 with the F16C conversion: exact for every half, subnormals included (the
// instruction does not consult the denormals-are-zero flag TF's threads set).
inline HwF LoadHw(const Half* p) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<HwF>(_mm256_cvtph_ps(halves));
}
#endif
inline HwF LoadHw(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return AsFloat(reinterpret_cast<HwI>(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16)));
}
inline HwF LoadBytesHw(const void* p) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<HwF>(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
}
#else
inline HwF LoadHw(const BFloat16* p) {
  typedef uint16_t U16 __attribute__((vector_size(kHardwareLanes * 2)));
  U16 bits;
  std::memcpy(&bits, p, sizeof(bits));
  return AsFloat(__builtin_convertvector(bits, HwI) << 16);
}
inline HwF LoadBytesHw(const void* p) {
  typedef uint8_t U8 __attribute__((vector_size(kHardwareLanes)));
  U8 bytes;
  std::memcpy(&bytes, p, sizeof(bytes));
  return __builtin_convertvector(__builtin_convertvector(bytes, HwI), HwF);
}
#endif
inline HwF LoadHw(const uint8_t* p) { return LoadBytesHw(p); }
inline HwF LoadHw(const bool* p) { return LoadBytesHw(p); }

// float16, float64 labels: lane by lane with ToCompute.
template <typename Storage>
inline HwF LoadHw(const Storage* p) {
  alignas(64) float lanes[kHardwareLanes];
  for (int i = 0; i < kHardwareLanes; ++i) lanes[i] = static_cast<float>(ToCompute(p[i]));
  return LoadHw(static_cast<const float*>(lanes));
}

template <typename Storage, int kParts>
inline VecF<kParts> LoadVec(const Storage* p, VecF<kParts>*) {
  VecF<kParts> v;
  for (int i = 0; i < kParts; ++i) v.part[i] = LoadHw(p + i * kHardwareLanes);
  return v;
}

template <typename Vec, typename Storage>
inline Vec Load(const Storage* p) {
  return LoadVec(p, static_cast<Vec*>(nullptr));
}

// The first `count` lanes from p, the rest 0 (row ends; never reads past p + count).
template <typename Vec, typename Storage>
inline Vec LoadPartial(const Storage* p, int count) {
  if constexpr (std::is_same_v<Vec, double>) {
    return static_cast<double>(ToCompute(*p));  // one lane: never partial
  } else {
    alignas(64) float lanes[Vec::kLanes] = {};
    for (int i = 0; i < count; ++i) lanes[i] = static_cast<float>(ToCompute(p[i]));
    return Vec::Load(lanes);
  }
}

// Lanes [0, count) set.
template <int kParts>
inline VecMask<kParts> FirstLanes(int count, VecF<kParts>*) {
  VecMask<kParts> m;
  for (int i = 0; i < kParts; ++i) m.part[i] = FirstLanesHw(count - i * kHardwareLanes);
  return m;
}
inline bool FirstLanes(int count, double*) { return count > 0; }

// ---------------------------------------------------------------------------------------
// Software prefetch of the streams a loop walks, kPrefetchBytes ahead of the vector it is
// on. Why: the hardware prefetchers do not cross 4 KiB pages, and the inputs are tensors the
// caller allocated, usually in 4 KiB pages, so every page of every stream would start with
// a miss. Out of cache this is a gain; in cache it costs only the extra instructions.
// The address is formed as an integer: it may lie past the buffer, which a prefetch never
// faults on but pointer arithmetic must not reach.
constexpr uintptr_t kPrefetchBytes = 2048;

template <int kLanes, typename Storage>
inline void PrefetchAhead(const Storage* p, bool for_write = false) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  for (uintptr_t b = 0; b < kLanes * sizeof(Storage); b += 64) {
    const void* line = reinterpret_cast<const void*>(ahead + b);
    if (for_write) {
      __builtin_prefetch(line, 1);
    } else {
      __builtin_prefetch(line, 0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Stores of the gradient in the logits' dtype.
template <typename Storage>
inline void StoreVec(double v, Storage* p) { *p = FromCompute<Storage>::Convert(v); }

inline void StoreHw(HwF v, float* p) { std::memcpy(p, &v, sizeof(v)); }

// float -> bfloat16 round-to-nearest-even on all lanes (FromCompute<BFloat16>'s rule), the
// bfloat16 bits in the low half of each int32 lane (logical shifts keep them in
// [0, 65535]). NaN (v != v) keeps its top bits, made quiet.
inline HwI BFloat16Bits(HwF v) {
  typedef uint32_t HwU __attribute__((vector_size(kHardwareLanes * 4)));
  const HwU bits = reinterpret_cast<HwU>(v);
  const HwU top = bits >> 16;
  const HwI rounded = reinterpret_cast<HwI>((bits + 0x7fff + (top & 1)) >> 16);
  const HwI is_nan = v != v;
  return (is_nan & reinterpret_cast<HwI>(top | 0x40)) | (~is_nan & rounded);
}

inline void StoreHw(HwF v, BFloat16* p) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // vcvtneps2bf16 rounds to nearest even and quiets NaN exactly as FromCompute<BFloat16>,
  // but reads a subnormal float as 0. TF's threads flush subnormal results, so such lanes
  // are rare (other callers may not): a vector with one (vfpclassps, class bit 5) takes the
  // integer rounding below. One instruction instead of the rounding and narrowing.
  const __m512 f = reinterpret_cast<__m512>(v);
  if (__builtin_expect(_mm512_fpclass_ps_mask(f, 0x20) == 0, 1)) {
    const __m256bh narrow = _mm512_cvtneps_pbh(f);
    std::memcpy(p, &narrow, sizeof(narrow));
    return;
  }
#endif
#if defined(__AVX512F__)  // one vpmovdw (the bits are in [0, 65535]: truncation is exact)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(BFloat16Bits(v))));
#else
  typedef uint16_t U16 __attribute__((vector_size(kHardwareLanes * 2)));
  const U16 narrow = __builtin_convertvector(BFloat16Bits(v), U16);
  std::memcpy(p, &narrow, sizeof(narrow));
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// With AVX2, two hardware vectors narrow with one saturating pack (it never saturates: the
// bits are in [0, 65535]) and one lane fix-up, instead of the compiler's per-vector
// narrowing in StoreHw.
template <int kParts>
inline void StoreVec(VecF<kParts> v, BFloat16* p) {
  auto bits = [&](int i) { return reinterpret_cast<__m256i>(BFloat16Bits(v.part[i])); };
  int i = 0;
  for (; i + 1 < kParts; i += 2) {  // packus works per 128-bit half: reorder the quadwords
    const __m256i packed = _mm256_packus_epi32(bits(i), bits(i + 1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i * kHardwareLanes),
                        _mm256_permute4x64_epi64(packed, 0xD8));
  }
  if (i < kParts) {
    const __m256i last = bits(i);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(last),
                                            _mm256_extracti128_si256(last, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i * kHardwareLanes), packed);
  }
}
#endif

// float -> float16 round to nearest even, overflow to inf, subnormal halves kept (the
// instruction ignores flush-to-zero): FromCompute<Half>'s rule, in one instruction.
#if defined(__AVX512F__)
inline void StoreHw(HwF v, Half* p) {
  const __m256i halves = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), halves);
}
#elif defined(__F16C__) && defined(__AVX2__)
inline void StoreHw(HwF v, Half* p) {
  const __m128i halves = _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves);
}
#endif

template <typename Storage>
inline void StoreHw(HwF v, Storage* p) {
  alignas(64) float lanes[kHardwareLanes];
  StoreHw(v, static_cast<float*>(lanes));
  for (int i = 0; i < kHardwareLanes; ++i) p[i] = FromCompute<Storage>::Convert(lanes[i]);
}

template <typename Storage, int kParts>
inline void StoreVec(VecF<kParts> v, Storage* p) {
  for (int i = 0; i < kParts; ++i) StoreHw(v.part[i], p + i * kHardwareLanes);
}

// The first `count` lanes of v to p (row ends).
template <typename Storage>
inline void StorePartial(double v, Storage* p, int /*count*/) { StoreVec(v, p); }
template <typename Storage, int kParts>
inline void StorePartial(VecF<kParts> v, Storage* p, int count) {
  alignas(64) float lanes[VecF<kParts>::kLanes];
  v.Store(lanes);
  for (int i = 0; i < count; ++i) p[i] = FromCompute<Storage>::Convert(lanes[i]);
}

// ---------------------------------------------------------------------------------------
// dst[i] += lane i, in float64.
inline void FoldInto(double v, double* dst) { dst[0] += v; }
// Half a hardware vector at a time, widened in registers (vcvtps2pd): the compiler turns a
// lane-by-lane loop into one scalar conversion, add and store per lane, a visible part of
// the forward pass. The same additions in the same order.
template <int kParts>
inline void FoldInto(VecF<kParts> v, double* dst) {
  constexpr int kHalf = kHardwareLanes / 2;
  typedef float HalfF __attribute__((vector_size(kHalf * 4)));
  typedef double HalfD __attribute__((vector_size(kHalf * 8)));
  alignas(64) float lanes[VecF<kParts>::kLanes];
  v.Store(lanes);
  for (int i = 0; i < VecF<kParts>::kLanes; i += kHalf) {
    HalfF narrow;
    HalfD sum;
    std::memcpy(&narrow, lanes + i, sizeof(narrow));
    std::memcpy(&sum, dst + i, sizeof(sum));
    sum += __builtin_convertvector(narrow, HalfD);
    std::memcpy(dst + i, &sum, sizeof(sum));
  }
}

// out[e] = src[e / repeats] for e in [0, count): each value repeated `repeats` times (a
// weight map broadcast over the classes of channels_last data). With repeats <= the vector
// width, a chunk of kHardwareLanes outputs is one permute of the kHardwareLanes values from
// its first output's source index `base` on: lane j takes (phase + j) / repeats, where
// phase = e % repeats, so the permute patterns are a table of `repeats` vectors and the
// loop carries only two scalars (no loop-carried vector chain). Chunks run while that window lies inside the values the outputs need (nothing
// past them is read); the last few values go one at a time. Longer runs are plain fills.
inline void RepeatEach(const float* src, int64_t repeats, int64_t count, float* out) {
  int64_t e = 0;
  if (repeats > kHardwareLanes) {
    for (int64_t value = 0; e < count; e += repeats, ++value) {
      std::fill(out + e, out + std::min(count, e + repeats), src[value]);
    }
    return;
  }
  const int32_t rep = static_cast<int32_t>(repeats);
  HwI pattern[kHardwareLanes];
  for (int32_t phase = 0; phase < rep; ++phase) {  // (phase + j) / rep, by counting
    for (int32_t j = 0, value = 0, copies = phase; j < kHardwareLanes; ++j) {
      pattern[phase][j] = value;
      if (++copies == rep) copies = 0, ++value;
    }
  }
  const int64_t needed = (count + repeats - 1) / repeats;  // src[0, needed) is read
  const int32_t step_value = kHardwareLanes / rep, step_phase = kHardwareLanes % rep;
  int64_t base = 0;
  int32_t phase = 0;
  for (; e + kHardwareLanes <= count && base + kHardwareLanes <= needed; e += kHardwareLanes) {
    HwF window;
    std::memcpy(&window, src + base, sizeof(window));
    const HwF chunk = __builtin_shuffle(window, pattern[phase]);
    std::memcpy(out + e, &chunk, sizeof(chunk));
    base += step_value;
    phase += step_phase;
    if (phase >= rep) phase -= rep, ++base;
  }
  for (; e < count; ++e) {
    out[e] = src[base];
    if (++phase == rep) phase = 0, ++base;
  }
}

// Whether any lane of a mask is set (once per block).
inline bool AnyLane(bool b) { return b; }
template <int kParts>
inline bool AnyLane(VecMask<kParts> m) {
  HwMask any = m.part[0];
  for (int i = 1; i < kParts; ++i) any |= m.part[i];
  return AnyHw(any);
}

}  // namespace fused_segloss
