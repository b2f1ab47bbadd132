// Host-side dtype dispatch shared by the CUDA launcher and the host simulation: maps the
// runtime (logits, labels) DType pair to storage types through the one dtype list of
// dtypes.h. No CUDA include.
#pragma once

#include <cstdint>

#include "dtypes.h"
#include "segloss_cpu.h"

namespace fused_segloss {
namespace cuda {

template <typename T> struct DTypeTag;
template <> struct DTypeTag<float> { static constexpr DType value = DType::kFloat32; };
template <> struct DTypeTag<double> { static constexpr DType value = DType::kFloat64; };
template <> struct DTypeTag<Half> { static constexpr DType value = DType::kFloat16; };
template <> struct DTypeTag<BFloat16> { static constexpr DType value = DType::kBFloat16; };
template <> struct DTypeTag<uint8_t> { static constexpr DType value = DType::kUInt8; };
template <> struct DTypeTag<bool> { static constexpr DType value = DType::kBool; };

// Calls fn(LogitT{}, LabelT{}) for the pair named by the dtypes and returns its result;
// returns `unsupported` when the pair is not in the lists.
template <typename Result, typename Fn>
Result DispatchDTypes(DType logits, DType labels, Result unsupported, Fn&& fn) {
#define FSL_CUDA_LABEL_CASE(LabelT, LogitT) \
  if (labels == DTypeTag<LabelT>::value) return fn(LogitT{}, LabelT{});
#define FSL_CUDA_LOGIT_CASE(LogitT, unused)                  \
  if (logits == DTypeTag<LogitT>::value) {                   \
    FSL_FOR_EACH_LABEL_TYPE(FSL_CUDA_LABEL_CASE, LogitT)     \
  }
  FSL_FOR_EACH_LOGIT_TYPE(FSL_CUDA_LOGIT_CASE, unused)
#undef FSL_CUDA_LOGIT_CASE
#undef FSL_CUDA_LABEL_CASE
  return unsupported;
}

inline int64_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kUInt8:
    case DType::kBool: return 1;
  }
  return 1;
}

}  // namespace cuda
}  // namespace fused_segloss
