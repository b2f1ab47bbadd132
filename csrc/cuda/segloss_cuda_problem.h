// Host-side preparation of a CUDA launch, shared by the launcher (segloss_cuda_launch.cu)
// and the host simulation (csrc/python/cuda_simulation.cc): the argument checks and the
// kernels' view of the problem (KernelProblem: pointers, weight strides, and whether the
// buffers are aligned for whole-group vector accesses). No CUDA include.
//
// Checks: the CPU kernels' shape rules (ValidateProblem), the dtype pair (the lists of
// dtypes.h), and the launch size (at most 2^31 - 1 blocks).
#pragma once

#include <cstdint>
#include <string>

#include "dtypes.h"
#include "segloss_cpu.h"
#include "segloss_cuda_plan.h"

namespace fused_segloss {
namespace cuda {

// "" when the problem can be launched, else what is wrong (names the argument).
inline std::string CheckLaunchProblem(const SeglossProblem& p) {
  const std::string error = ValidateProblem(p);  // the CPU kernel's shape rules
  if (!error.empty()) return error;
  if (!DTypesSupported(p.logits_dtype, p.labels_dtype)) {
    return std::string("unsupported dtypes: `logits` ") + DTypeName(p.logits_dtype) +
           ", `labels` " + DTypeName(p.labels_dtype);
  }
  const LaunchPlan plan = MakeLaunchPlan(p.shape, MaxThreadsFor(p.logits_dtype));
  if (plan.num_blocks > 0x7fffffff) {
    return "`logits` is too large for one CUDA launch (" + std::to_string(plan.num_blocks) +
           " blocks > 2^31 - 1)";
  }
  return "";
}

inline bool AlignedForGroups(const void* ptr, DType dtype) {
  return reinterpret_cast<uintptr_t>(ptr) % (kSlots * DTypeSize(dtype)) == 0;
}

// grad_out: the gradient output (its alignment matters too), or null for the forward.
inline KernelProblem MakeKernelProblem(const SeglossProblem& p, const void* grad_out) {
  KernelProblem k;
  k.shape = p.shape;
  k.logits = p.logits;
  k.labels = p.labels;
  k.weights = p.weights;
  k.strides = MakeWeightStrides(p.shape, p.weights_batch, p.weights_positions, p.weights_classes);
  k.pos_weight = p.pos_weight;
  k.focal = p.focal;
  k.vector_loads = AlignedForGroups(p.logits, p.logits_dtype) &&
                   AlignedForGroups(p.labels, p.labels_dtype) &&
                   (grad_out == nullptr || AlignedForGroups(grad_out, p.logits_dtype));
  return k;
}

}  // namespace cuda
}  // namespace fused_segloss
