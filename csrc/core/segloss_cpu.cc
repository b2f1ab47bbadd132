// The CPU kernels' entry points (segloss_cpu.h): argument checks, the dtype dispatch to
// the typed passes (sigmoid: segloss_cpu_forward.cc and segloss_cpu_grad.cc; softmax:
// segloss_cpu_softmax_forward.cc and segloss_cpu_softmax_grad.cc, dense labels or class
// ids), and the fixed work plan of the sigmoid passes. No per-element math here (that is
// segloss_math.h and segloss_softmax_math.h).
//
// Checks: shapes and pointers (ValidateProblem, also the CUDA launcher's), pos_weight
// values (finite, >= 0), the options softmax mode excludes (pos_weight, focal_alpha), and
// the (logits, labels) dtype pair. Label, class id and weight values are
// checked during the forward pass itself (InvalidValuesMessage); the gradient trusts them,
// because a forward pass over the same inputs came first.
#include "segloss_cpu.h"

#include <algorithm>
#include <numeric>

#include "segloss_cpu_blocks.h"
#include "segloss_cpu_softmax.h"

namespace fused_segloss {
namespace {

// "" when the kernels exist for the problem's dtype pair, else what is wrong.
std::string CheckDTypes(const SeglossProblem& p) {
  if (DTypesSupported(p.logits_dtype, p.labels_dtype, p.sparse_labels)) return "";
  if (!DTypesSupported(p.logits_dtype, DType::kFloat32)) {
    return std::string("`logits` must be float16, bfloat16, float32 or float64, got ") +
           DTypeName(p.logits_dtype);
  }
  return std::string(p.sparse_labels
                         ? "sparse `labels` (class ids) must be uint8, int32 or int64, got "
                         : "dense `labels` must be a float type, uint8 or bool, got ") +
         DTypeName(p.labels_dtype);
}

}  // namespace

std::string InvalidValuesMessage(int64_t invalid_labels, int64_t invalid_weights) {
  if (invalid_labels > 0) {
    return "`labels` must lie in [0, 1] (uint8 labels must be 0 or 1); found " +
           std::to_string(invalid_labels) + " value(s) outside that range or NaN";
  }
  if (invalid_weights > 0) {
    return "`weights` must be finite and >= 0; found " + std::to_string(invalid_weights) +
           " negative, infinite or NaN value(s)";
  }
  return "";
}

std::string InvalidClassIdsMessage(const SeglossProblem& p, int64_t count, int64_t min_bad,
                                   int64_t max_bad) {
  if (count == 0) return "";
  std::string msg = "`labels` class ids must lie in [0, C) = [0, " +
                    std::to_string(p.shape.classes) + ")";
  if (p.has_ignore_index) msg += " or equal ignore_index = " + std::to_string(p.ignore_index);
  return msg + "; found " + std::to_string(count) + " id(s) outside, from " +
         std::to_string(min_bad) + " to " + std::to_string(max_bad);
}

void SerialFor(int64_t n, int64_t /*cost_per_item*/, const RangeFn& fn) {
  if (n > 0) fn(0, n);
}

StatsWorkPlan MakeStatsWorkPlan(const ProblemShape& shape) {
  StatsWorkPlan plan;
  const int64_t width = shape.channels_last ? std::max<int64_t>(shape.classes, 1) : 1;
  plan.positions_per_item = std::max<int64_t>(1, cpu::kItemElements / width);
  plan.items_per_row = (shape.positions + plan.positions_per_item - 1) / plan.positions_per_item;
  const int64_t rows = shape.channels_last ? shape.batch : shape.batch * shape.classes;
  plan.num_items = rows * plan.items_per_row;
  return plan;
}

int64_t AccumulatorPeriod(const ProblemShape& shape) {
  // Whole vectors per row where that stays small (every C up to 16 classes); else one
  // position per row, its last vector partial. The widest compute vector sets the width.
  constexpr int64_t kWidth = 2 * kHardwareLanes;
  if (!shape.channels_last) return kWidth;
  const int64_t lcm = std::lcm(std::max<int64_t>(shape.classes, 1), kWidth);
  return lcm <= 16 * kWidth ? lcm : shape.classes;
}

std::string ValidateProblem(const SeglossProblem& p) {
  const ProblemShape& s = p.shape;
  if (s.batch < 0 || s.positions < 0 || s.classes < 0) return "negative dimension in `logits`";
  if (s.classes == 0) return "`logits` must have at least one class (C >= 1), got C = 0";
  const int64_t total = s.batch * s.positions * s.classes;
  if (total > 0 && (p.logits == nullptr || p.labels == nullptr)) {
    return "`logits` and `labels` must not be null";
  }
  // Absent weights keep the 1x1x1 defaults and pass.
  const int64_t full[3] = {s.batch, s.positions, s.classes};
  const int64_t got[3] = {p.weights_batch, p.weights_positions, p.weights_classes};
  const char* names[3] = {"batch", "spatial", "class"};
  for (int i = 0; i < 3; ++i) {
    if (got[i] != 1 && got[i] != full[i]) {
      return std::string("`weights` ") + names[i] + " size " + std::to_string(got[i]) +
             " does not broadcast to the logits' " + std::to_string(full[i]);
    }
  }
  // Written so that NaN fails too (the Python layer checks these first).
  if (!(p.focal.gamma >= 0.0f && p.focal.gamma <= 3.0e38f)) {
    return "`focal_gamma` must be finite and >= 0, got " + std::to_string(p.focal.gamma);
  }
  if (!(p.focal.alpha <= 1.0f)) {
    return "`focal_alpha` must lie in [0, 1] (negative: none), got " +
           std::to_string(p.focal.alpha);
  }
  if (p.activation != Activation::kSigmoid && p.activation != Activation::kSoftmax) {
    return "`activation` must be sigmoid or softmax";
  }
  if (p.activation == Activation::kSoftmax) {
    if (p.pos_weight != nullptr) {
      return "`pos_weight` has no meaning with activation='softmax' (use class_weights)";
    }
    if (p.focal.alpha >= 0.0f) {
      return "`focal_alpha` has no meaning with activation='softmax' (use class_weights), "
             "got " + std::to_string(p.focal.alpha);
    }
  } else if (p.sparse_labels || p.has_ignore_index) {
    return "sparse `labels` (class ids) and `ignore_index` need activation='softmax'";
  }
  if (p.has_ignore_index && !p.sparse_labels) {
    return "`ignore_index` needs sparse integer `labels` (class ids)";
  }
  return "";
}

std::string ValidatePosWeight(const SeglossProblem& p) {
  if (p.pos_weight == nullptr) return "";
  int64_t invalid = 0;
  for (int64_t c = 0; c < p.shape.classes; ++c) invalid += WeightIsValid(p.pos_weight[c]) ? 0 : 1;
  if (invalid == 0) return "";
  return "`pos_weight` must be finite and >= 0; found " + std::to_string(invalid) +
         " negative, infinite or NaN value(s)";
}

std::string ComputeStatsCpu(const SeglossProblem& problem, const ParallelFor& parallel_for,
                            float* stats_out) {
  std::string error = ValidateProblem(problem);
  if (error.empty()) error = ValidatePosWeight(problem);
  if (error.empty()) error = CheckDTypes(problem);
  if (!error.empty()) return error;
  if (problem.activation == Activation::kSoftmax) {
    return DispatchLabelDTypes<std::string>(
        problem.sparse_labels, problem.logits_dtype, problem.labels_dtype, std::string(),
        [&](auto logit_tag, auto label_tag, auto sparse) {
          return cpu::SoftmaxStatsForTypes<decltype(logit_tag), decltype(label_tag),
                                           decltype(sparse)::value>(problem, parallel_for,
                                                                    stats_out);
        });
  }
  return DispatchDTypes<std::string>(
      problem.logits_dtype, problem.labels_dtype, std::string(),
      [&](auto logit_tag, auto label_tag) {
        return cpu::StatsForTypes<decltype(logit_tag), decltype(label_tag)>(
            problem, parallel_for, stats_out);
      });
}

std::string ComputeLogitGradCpu(const SeglossProblem& problem, const float* grad_stats,
                                const ParallelFor& parallel_for, void* grad_logits_out) {
  std::string error = ValidateProblem(problem);
  if (error.empty()) error = CheckDTypes(problem);
  if (!error.empty()) return error;
  if (problem.activation == Activation::kSoftmax) {
    return DispatchLabelDTypes<std::string>(
        problem.sparse_labels, problem.logits_dtype, problem.labels_dtype, std::string(),
        [&](auto logit_tag, auto label_tag, auto sparse) {
          return cpu::SoftmaxLogitGradForTypes<decltype(logit_tag), decltype(label_tag),
                                               decltype(sparse)::value>(
              problem, grad_stats, parallel_for, grad_logits_out);
        });
  }
  return DispatchDTypes<std::string>(
      problem.logits_dtype, problem.labels_dtype, std::string(),
      [&](auto logit_tag, auto label_tag) {
        return cpu::LogitGradForTypes<decltype(logit_tag), decltype(label_tag)>(
            problem, grad_stats, parallel_for, grad_logits_out);
      });
}

}  // namespace fused_segloss
