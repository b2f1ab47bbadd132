// Host-side preparation of a launch, shared by the CUDA launcher and the host
// simulation (csrc/python/cuda_simulation.cc): argument checks, the kernels' view of
// the problem, and the message for invalid values. No CUDA include.
#pragma once

#include <string>

#include "segloss_cpu.h"
#include "segloss_cuda_dispatch.h"
#include "segloss_cuda_plan.h"

namespace fused_segloss {
namespace cuda {

// "" when the problem can be launched, else what is wrong (names the argument).
inline std::string CheckLaunchProblem(const SeglossProblem& p) {
  const std::string error = ValidateProblem(p);  // the CPU kernel's shape rules
  if (!error.empty()) return error;
  const ProblemShape& s = p.shape;
  const bool supported = DispatchDTypes<bool>(p.logits_dtype, p.labels_dtype, false,
                                              [](auto, auto) { return true; });
  if (!supported) {
    return std::string("unsupported dtypes: `logits` ") + DTypeName(p.logits_dtype) +
           ", `labels` " + DTypeName(p.labels_dtype);
  }
  const LaunchPlan plan = MakeLaunchPlan(s, MaxThreadsFor(p.logits_dtype));
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
  k.vector_loads = AlignedForGroups(p.logits, p.logits_dtype) &&
                   AlignedForGroups(p.labels, p.labels_dtype) &&
                   (grad_out == nullptr || AlignedForGroups(grad_out, p.logits_dtype));
  return k;
}

// The CPU kernel's wording (segloss_cpu.cc CountsError), so that both devices report
// invalid values identically; tests/test_cuda_host_simulation.py compares the two.
inline std::string CountsMessage(int64_t invalid_labels, int64_t invalid_weights) {
  return InvalidValuesMessage(invalid_labels, invalid_weights);  // the CPU kernel's wording
}

}  // namespace cuda
}  // namespace fused_segloss
