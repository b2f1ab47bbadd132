// Builds a SeglossProblem from the shapes and pointers of the op's operands, with every
// shape rule and its message in one place. The TF OpKernels (CPU and GPU) and the XLA
// FFI handlers (Host and CUDA) are thin adapters that call this.
//
// Operand conventions (the Python layer canonicalises user inputs into them):
//   logits      [B, *S, C] or [B, C, *S], 0 to 3 spatial dims (rank 2..5)
//   labels      the logits' shape; in softmax mode also [B, *S] class ids (the logits'
//               shape without the class axis: sparse labels)
//   weights     float32 canonical view [Bw, Nw, Cw] / [Bw, Cw, Nw] (each axis 1 or full),
//               or a rank-1 empty tensor meaning "no weights"
//   pos_weight  float32 [C], or a rank-0 tensor meaning "all ones"
#pragma once

#include <cstdint>
#include <string>

#include "segloss_cpu.h"

namespace fused_segloss {

struct OperandView {
  const void* data = nullptr;
  const int64_t* dims = nullptr;
  int rank = 0;
};

std::string ShapeString(const int64_t* dims, int rank);

// The options every adapter reads from its attributes.
struct ProblemOptions {
  bool channels_last = true;
  bool squared = false;
  Activation activation = Activation::kSigmoid;
  bool has_ignore_index = false;
  int64_t ignore_index = 0;
  FocalOptions focal;
};

// Fills everything (the caller has set problem->logits_dtype and labels_dtype from its
// framework's dtype enum: sparse labels are recognised by shape and need an id dtype).
// Returns "" or a message naming the argument and what was expected.
std::string ProblemFromOperands(const OperandView& logits, const OperandView& labels,
                                const OperandView& weights, const OperandView& pos_weight,
                                const ProblemOptions& options, SeglossProblem* problem);

// `grad_stats` must be [B, C, 8].
std::string CheckGradStatsShape(const SeglossProblem& problem, const int64_t* dims, int rank);

}  // namespace fused_segloss
