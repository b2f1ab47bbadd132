// TF op registrations and shape functions: FusedSeglossStats (logits, labels, weights,
// pos_weight -> float32 stats [B, C, 8]) and FusedSeglossStatsGrad (the same inputs plus
// grad_stats = dL/dstats [B, C, 8] -> dL/dlogits, the logits' shape and dtype). The
// columns and the per-element math are those of csrc/core/segloss_math.h; the kernels are
// segloss_kernels_cpu.cc and segloss_kernels_gpu.cc.
//
// The Python layer canonicalises the optional inputs before calling these ops:
//   weights:    float32 [Bw, Nw, Cw] (channels_last) or [Bw, Cw, Nw] (channels_first),
//               every axis 1 or full; a rank-1 empty tensor means "no weights".
//   pos_weight: float32 [C]; an empty tensor means "all ones".
// Labels: the logits' shape (dense: a float type, uint8 or bool), or in softmax mode the
// logits' shape without the class axis (sparse class ids: uint8, int32 or int64).
// Attributes of both ops: data_format, squared, activation ('sigmoid': independent
// classes; 'softmax': one class per pixel, csrc/core/segloss_softmax_math.h),
// has_ignore_index and ignore_index (sparse labels: that id gives the pixel weight 0), and
// the focal modulation of ce_sum
// (csrc/core/segloss_focal_math.h): focal_gamma >= 0 (finite) and focal_alpha in [0, 1],
// where a negative focal_alpha means "no alpha" (a_t = 1). The defaults 0 and -1 are the
// plain cross-entropy; the Python layer checks the values, the kernels check them again.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tensorflow {
namespace {

using shape_inference::DimensionHandle;
using shape_inference::InferenceContext;
using shape_inference::ShapeHandle;

absl::Status StatsShape(InferenceContext* c) {
  ShapeHandle logits;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 2, &logits));
  TF_RETURN_IF_ERROR(c->WithRankAtMost(logits, 5, &logits));
  std::string data_format, activation;
  TF_RETURN_IF_ERROR(c->GetAttr("data_format", &data_format));
  TF_RETURN_IF_ERROR(c->GetAttr("activation", &activation));
  const bool channels_last = data_format == "channels_last";
  // Dense labels have the logits' shape; sparse class ids (softmax) lack the class axis.
  // The kernels check the rule with the values' shapes; only the dense case merges here.
  const bool maybe_sparse = activation == "softmax" && c->RankKnown(c->input(1)) &&
                            c->RankKnown(logits) && c->Rank(c->input(1)) == c->Rank(logits) - 1;
  if (!maybe_sparse) {
    ShapeHandle labels;
    TF_RETURN_IF_ERROR(c->Merge(logits, c->input(1), &labels));
  }
  DimensionHandle classes = c->Dim(logits, channels_last ? -1 : 1);
  c->set_output(0, c->MakeShape({c->Dim(logits, 0), classes, c->MakeDim(8)}));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("FusedSeglossStats")
    .Input("logits: T")
    .Input("labels: TL")
    .Input("weights: float")
    .Input("pos_weight: float")
    .Output("stats: float")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("TL: {half, bfloat16, float, double, uint8, bool, int32, int64}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .Attr("squared: bool = false")
    .Attr("focal_gamma: float = 0")
    .Attr("focal_alpha: float = -1")
    .Attr("activation: {'sigmoid', 'softmax'} = 'sigmoid'")
    .Attr("has_ignore_index: bool = false")
    .Attr("ignore_index: int = 0")
    .SetShapeFn(StatsShape)
    .Doc(R"doc(
Per-image, per-class sums [B, C, 8] of the sigmoid cross-entropy and soft-Dice terms
(ce_sum, weight_sum, intersection, pred_sum, label_sum, hard_tp, hard_pred, hard_label).
)doc");

REGISTER_OP("FusedSeglossStatsGrad")
    .Input("logits: T")
    .Input("labels: TL")
    .Input("weights: float")
    .Input("pos_weight: float")
    .Input("grad_stats: float")
    .Output("grad_logits: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("TL: {half, bfloat16, float, double, uint8, bool, int32, int64}")
    .Attr("data_format: {'channels_last', 'channels_first'} = 'channels_last'")
    .Attr("squared: bool = false")
    .Attr("focal_gamma: float = 0")
    .Attr("focal_alpha: float = -1")
    .Attr("activation: {'sigmoid', 'softmax'} = 'sigmoid'")
    .Attr("has_ignore_index: bool = false")
    .Attr("ignore_index: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc("Gradient of FusedSeglossStats with respect to the logits.");

}  // namespace tensorflow
