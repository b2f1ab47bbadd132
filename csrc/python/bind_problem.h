// NumPy arrays -> SeglossProblem for the pybind11 module (core kernels and the CUDA host
// simulation): logits, labels, weights (None or the canonical rank-3 view), pos_weight
// (None or [C]). The shape rules are the shared ones of core/segloss_operands.h.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "segloss_operands.h"

namespace fused_segloss_py {

namespace py = pybind11;
using fused_segloss::DType;

inline DType DTypeOfArray(const py::array& a, const char* arg) {
  const std::string name = py::str(a.dtype().attr("name"));
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  const bool labels = std::string(arg) == "labels";
  if (labels && name == "uint8") return DType::kUInt8;
  if (labels && name == "bool") return DType::kBool;
  if (labels && name == "int32") return DType::kInt32;
  if (labels && name == "int64") return DType::kInt64;
  throw py::value_error(std::string("`") + arg + "` has unsupported dtype " + name +
                        "; expected float16, bfloat16, float32 or float64" +
                        (labels ? ", uint8, bool, int32 or int64" : ""));
}

// C-contiguous and in native byte order (the kernels read raw memory). An already
// contiguous view is kept as is, so a misaligned view stays misaligned.
inline py::array Contiguous(const py::object& obj) {
  py::array a = py::module_::import("numpy").attr("ascontiguousarray")(obj);
  if (!a.dtype().attr("isnative").cast<bool>()) {
    a = a.attr("astype")(a.dtype().attr("newbyteorder")("="));
  }
  return a;
}

// The arrays behind a SeglossProblem, kept alive with it.
struct BoundProblem {
  fused_segloss::SeglossProblem problem;
  py::array logits, labels, weights, pos_weight;
  std::vector<int64_t> dims[4];
};

inline fused_segloss::OperandView ViewOf(const py::array& a, std::vector<int64_t>* dims) {
  dims->assign(a.shape(), a.shape() + a.ndim());
  return {a.data(), dims->data(), static_cast<int>(a.ndim())};
}

// weights: None or the canonical rank-3 view; pos_weight: None or [C]; options: the
// attributes (data format, squared, activation, ignore_index, focal), checked with the shapes.
inline BoundProblem BindProblem(const py::object& logits, const py::object& labels,
                                const py::object& weights, const py::object& pos_weight,
                                const fused_segloss::ProblemOptions& options) {
  using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
  BoundProblem b;
  b.logits = Contiguous(logits);
  b.labels = Contiguous(labels);
  b.weights = weights.is_none() ? FloatArray(std::vector<py::ssize_t>{0}) : FloatArray(weights);
  b.pos_weight = pos_weight.is_none() ? FloatArray(std::vector<py::ssize_t>{})
                                      : FloatArray(pos_weight);
  auto& p = b.problem;
  p.logits_dtype = DTypeOfArray(b.logits, "logits");
  p.labels_dtype = DTypeOfArray(b.labels, "labels");
  const std::string error = fused_segloss::ProblemFromOperands(
      ViewOf(b.logits, &b.dims[0]), ViewOf(b.labels, &b.dims[1]), ViewOf(b.weights, &b.dims[2]),
      ViewOf(b.pos_weight, &b.dims[3]), options, &p);
  if (!error.empty()) throw py::value_error(error);
  return b;
}

// ProblemOptions from the keyword arguments of the module functions (focal_alpha < 0: none;
// ignore_index None: no ignored id).
inline fused_segloss::ProblemOptions OptionsFromArgs(bool channels_last, bool squared,
                                                     float focal_gamma, float focal_alpha,
                                                     const std::string& activation,
                                                     const py::object& ignore_index) {
  fused_segloss::ProblemOptions o;
  o.channels_last = channels_last;
  o.squared = squared;
  o.focal.gamma = focal_gamma;
  o.focal.alpha = focal_alpha;
  if (activation == "softmax") {
    o.activation = fused_segloss::Activation::kSoftmax;
  } else if (activation != "sigmoid") {
    throw py::value_error("`activation` must be 'sigmoid' or 'softmax', got " + activation);
  }
  o.has_ignore_index = !ignore_index.is_none();
  if (o.has_ignore_index) o.ignore_index = ignore_index.cast<int64_t>();
  return o;
}

}  // namespace fused_segloss_py
