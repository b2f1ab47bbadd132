// Host-side preparation of a CUDA launch, shared by the launcher (segloss_cuda_launch.cu)
// and the host simulation (csrc/python/cuda_simulation.cc): the argument checks and the
// kernels' view of the problem (KernelProblem: pointers, weight strides, and whether the
// buffers are aligned for whole-group vector accesses). No CUDA include.
//
// Checks: the CPU kernels' shape rules (ValidateProblem), the dtype pair (the lists of
// dtypes.h; class-id dtypes for sparse softmax labels), and the launch size (at most
// 2^31 - 1 blocks of the plan of the problem's activation).
#pragma once

#include <cstdint>
#include <string>

#include "dtypes.h"
#include "segloss_cpu.h"
#include "segloss_cuda_plan.h"

namespace fused_segloss {
namespace cuda {

// The launch geometry of a problem: softmax mode has its own (MakeSoftmaxLaunchPlan).
inline LaunchPlan PlanForProblem(const SeglossProblem& p) {
  const int max_threads = MaxThreadsFor(p.logits_dtype);
  return p.activation == Activation::kSoftmax ? MakeSoftmaxLaunchPlan(p.shape, max_threads)
                                              : MakeLaunchPlan(p.shape, max_threads);
}

// "" when the problem can be launched, else what is wrong (names the argument).
inline std::string CheckLaunchProblem(const SeglossProblem& p) {
  const std::string error = ValidateProblem(p);  // the CPU kernel's shape rules
  if (!error.empty()) return error;
  if (p.sparse_labels && p.activation != Activation::kSoftmax) {
    return "sparse `labels` (class ids) need activation='softmax'";
  }
  const bool supported =
      p.sparse_labels
          ? DispatchClassIdDTypes<bool>(p.logits_dtype, p.labels_dtype, false,
                                        [](auto, auto) { return true; })
          : DTypesSupported(p.logits_dtype, p.labels_dtype);
  if (!supported) {
    return std::string("unsupported dtypes: `logits` ") + DTypeName(p.logits_dtype) +
           ", `labels` " + DTypeName(p.labels_dtype) +
           (p.sparse_labels ? " (class ids: uint8, int32 or int64)" : "");
  }
  const LaunchPlan plan = PlanForProblem(p);
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
  k.squared = p.squared;
  k.has_ignore_index = p.has_ignore_index;
  k.ignore_index = p.ignore_index;
  k.vector_loads = AlignedForGroups(p.logits, p.logits_dtype) &&
                   AlignedForGroups(p.labels, p.labels_dtype) &&
                   (grad_out == nullptr || AlignedForGroups(grad_out, p.logits_dtype));
  return k;
}

}  // namespace cuda
}  // namespace fused_segloss
