// The storage dtypes of the kernels, their runtime tags and the one dtype dispatch,
// framework-free (host and CUDA device code).
//
// Operands: logits are float32, float64, float16 or bfloat16; dense labels any of those,
// uint8 or bool; sparse labels (softmax class ids) uint8, int32 or int64. DType names them at run time (the frameworks map their own dtype enums to it);
// FSL_FOR_EACH_LOGIT_TYPE / FSL_FOR_EACH_LABEL_TYPE list them at compile time, and
// DispatchDTypes (DispatchClassIdDTypes for class ids, DispatchLabelDTypes for either) maps a runtime (logits, labels) pair to those types for every caller (the
// CPU kernels, the CUDA launcher and its host simulation).
// Math: float64 is computed in float64, every other dtype in float32 (ComputeTypeOf);
// ToCompute widens exactly, FromCompute rounds to nearest even.
//
// Half and BFloat16 are layout-compatible with Eigen::half / Eigen::bfloat16 / __half /
// __nv_bfloat16 (one uint16), so framework code reinterpret_casts its pointers to them.
// The conversions are written with integer bit operations (no F16C or CUDA intrinsics
// needed) so that CPU loops over them vectorise and the same code runs on the device.
#pragma once

#include <cstdint>
#include <type_traits>

#include "segloss_math.h"

namespace fused_segloss {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Runtime dtype tags. The values are part of the C ABI of csrc/cuda/segloss_cuda_capi.cc.
enum class DType : int { kFloat32 = 0, kFloat64, kFloat16, kBFloat16, kUInt8, kBool, kInt32, kInt64 };

inline const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown";
}

// Bytes per element.
inline int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
    case DType::kInt64: return 8;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kUInt8:
    case DType::kBool: return 1;
  }
  return 1;
}

// The storage type of each tag.
template <typename T> struct DTypeTag;
template <> struct DTypeTag<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeTag<double> { static constexpr DType value = DType::kFloat64; };
template <> struct DTypeTag<Half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeTag<BFloat16> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeTag<uint8_t> { static constexpr DType value = DType::kUInt8; };
template <> struct DTypeTag<bool> { static constexpr DType value = DType::kBool; };
template <> struct DTypeTag<int32_t> { static constexpr DType value = DType::kInt32; };
template <> struct DTypeTag<int64_t> { static constexpr DType value = DType::kInt64; };

// The dtypes the kernels are instantiated for: one list, used by DispatchDTypes and by
// every explicit instantiation (M(Type, args...) for each).
#define FSL_FOR_EACH_LOGIT_TYPE(M, ...) \
  M(float, __VA_ARGS__)                 \
  M(double, __VA_ARGS__)                \
  M(::fused_segloss::Half, __VA_ARGS__) \
  M(::fused_segloss::BFloat16, __VA_ARGS__)

#define FSL_FOR_EACH_LABEL_TYPE(M, ...)     \
  M(float, __VA_ARGS__)                     \
  M(double, __VA_ARGS__)                    \
  M(::fused_segloss::Half, __VA_ARGS__)     \
  M(::fused_segloss::BFloat16, __VA_ARGS__) \
  M(uint8_t, __VA_ARGS__)                   \
  M(bool, __VA_ARGS__)

// Sparse labels (softmax mode): one class id per position, read as int64.
#define FSL_FOR_EACH_CLASS_ID_TYPE(M, ...) \
  M(uint8_t, __VA_ARGS__)                  \
  M(int32_t, __VA_ARGS__)                  \
  M(int64_t, __VA_ARGS__)

// Calls fn(LogitT{}, LabelT{}) for the pair of storage types named by the tags and returns
// its result; returns `unsupported` when the pair is not in the lists. Host code only.
template <typename Result, typename Fn>
Result DispatchDTypes(DType logits, DType labels, Result unsupported, Fn&& fn) {
#define FSL_DISPATCH_LABEL_CASE(LabelT, LogitT) \
  if (labels == DTypeTag<LabelT>::value) return fn(LogitT{}, LabelT{});
#define FSL_DISPATCH_LOGIT_CASE(LogitT, unused)            \
  if (logits == DTypeTag<LogitT>::value) {                 \
    FSL_FOR_EACH_LABEL_TYPE(FSL_DISPATCH_LABEL_CASE, LogitT) \
  }
  FSL_FOR_EACH_LOGIT_TYPE(FSL_DISPATCH_LOGIT_CASE, unused)
#undef FSL_DISPATCH_LOGIT_CASE
#undef FSL_DISPATCH_LABEL_CASE
  return unsupported;
}

// DispatchDTypes for sparse labels: fn(LogitT{}, IdT{}) with IdT from the class-id list.
template <typename Result, typename Fn>
Result DispatchClassIdDTypes(DType logits, DType labels, Result unsupported, Fn&& fn) {
#define FSL_DISPATCH_ID_CASE(IdT, LogitT) \
  if (labels == DTypeTag<IdT>::value) return fn(LogitT{}, IdT{});
#define FSL_DISPATCH_LOGIT_CASE(LogitT, unused)              \
  if (logits == DTypeTag<LogitT>::value) {                   \
    FSL_FOR_EACH_CLASS_ID_TYPE(FSL_DISPATCH_ID_CASE, LogitT) \
  }
  FSL_FOR_EACH_LOGIT_TYPE(FSL_DISPATCH_LOGIT_CASE, unused)
#undef FSL_DISPATCH_LOGIT_CASE
#undef FSL_DISPATCH_ID_CASE
  return unsupported;
}

// A problem's dispatch: fn(LogitT{}, LabelT{}, std::bool_constant<sparse>{}), LabelT from
// the class-id list for sparse labels (softmax), else from the labels list.
template <typename Result, typename Fn>
Result DispatchLabelDTypes(bool sparse, DType logits, DType labels, Result unsupported,
                           Fn&& fn) {
  if (sparse) {
    return DispatchClassIdDTypes<Result>(
        logits, labels, unsupported, [&](auto x, auto z) { return fn(x, z, std::true_type{}); });
  }
  return DispatchDTypes<Result>(logits, labels, unsupported,
                                [&](auto x, auto z) { return fn(x, z, std::false_type{}); });
}

// Whether the kernels exist for this (logits, labels) pair (class ids when sparse).
inline bool DTypesSupported(DType logits, DType labels, bool sparse = false) {
  return DispatchLabelDTypes<bool>(sparse, logits, labels, false,
                                   [](auto, auto, auto) { return true; });
}

// Compute type: float64 stays float64; everything else is computed in float32.
template <typename T>
struct ComputeTypeOf {
  using type = float;
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};

FSL_HD float ToCompute(float v) { return v; }
FSL_HD double ToCompute(double v) { return v; }
FSL_HD float ToCompute(uint8_t v) { return static_cast<float>(v); }
FSL_HD float ToCompute(bool v) { return v ? 1.0f : 0.0f; }
FSL_HD float ToCompute(BFloat16 v) { return BitsToFloat(static_cast<int32_t>(v.bits) << 16); }

// IEEE half -> float, exact for every input including subnormals, inf and NaN. Normal
// halves are rebiased in the exponent bits (15 -> 127); subnormal halves are m·2^-24,
// computed as an int-to-float conversion times a normal constant. (Rebiasing subnormals
// by multiplying a float subnormal with 2^112 would be shorter, but TF's worker threads
// run with denormals-are-zero, which turns that operand into 0.)
FSL_HD float ToCompute(Half v) {
  const int32_t magnitude = v.bits & 0x7fff;
  const float normal = BitsToFloat((magnitude << 13) + (112 << 23));
  const float subnormal = static_cast<float>(magnitude) * 5.9604644775390625e-08f;  // 2^-24
  const int32_t inf_nan = magnitude >= 0x7c00 ? 0x7f800000 : 0;
  const float value = magnitude < 0x0400 ? subnormal : normal;
  const int32_t sign = static_cast<int32_t>(v.bits & 0x8000) << 16;
  return BitsToFloat(FloatBits(value) | inf_nan | sign);
}

// Compute type -> storage type, round to nearest even.
template <typename T>
struct FromCompute;
template <>
struct FromCompute<float> {
  FSL_HD static float Convert(float v) { return v; }
};
template <>
struct FromCompute<double> {
  FSL_HD static double Convert(double v) { return v; }
};
template <>
struct FromCompute<BFloat16> {
  FSL_HD static BFloat16 Convert(float v) {
    const int32_t bits = FloatBits(v);
    const int32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    const bool is_nan = (bits & 0x7fffffff) > 0x7f800000;
    BFloat16 out;
    out.bits = static_cast<uint16_t>(is_nan ? ((bits >> 16) | 0x40) : rounded);
    return out;
  }
};
template <>
struct FromCompute<Half> {
  // float -> half, round to nearest even, with overflow to inf, subnormals and NaN.
  FSL_HD static Half Convert(float v) {
    const int32_t bits = FloatBits(v);
    const int32_t sign = (bits >> 16) & 0x8000;
    const int32_t magnitude = bits & 0x7fffffff;
    int32_t result;
    if (magnitude > 0x7f800000) {
      result = 0x7e00;  // NaN
    } else if (magnitude >= 0x477ff000) {
      result = 0x7c00;  // rounds to >= 65520: inf
    } else if (magnitude < 0x38800000) {
      // Subnormal half: adding 0.5 aligns the mantissa so the float adder rounds for us.
      const float shifted = BitsToFloat(magnitude) + 0.5f;
      result = FloatBits(shifted) - FloatBits(0.5f);
    } else {
      const int32_t odd = (magnitude >> 13) & 1;
      result = (magnitude - (112 << 23) + 0xfff + odd) >> 13;
    }
    Half out;
    out.bits = static_cast<uint16_t>(result | sign);
    return out;
  }
};

}  // namespace fused_segloss
