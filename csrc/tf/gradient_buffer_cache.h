// Reuse of the CPU gradient kernel's output buffers across calls (segloss_kernels_cpu.cc).
//
// Why: a logits-sized gradient is tens of MB. TF's CPU allocator hands such sizes to
// glibc, which maps fresh pages for each one (above its mmap threshold) and unmaps them on
// free, so every call pays page faults and the kernel zeroing the pages, which can take
// longer than the gradient pass itself. The kernel keeps the last kSlots buffers it
// allocated and hands one back out once nobody else holds it (the caller released last
// step's gradient), so a steady training loop writes into warm memory. Two slots because a loop like `grads = tape.gradient(...)` still references the
// previous gradient while the next one is computed.
//
// Cost: up to kSlots idle buffers of the latest gradient shapes stay allocated while the
// kernel lives (TF caches kernels per op attributes); only buffers of at least
// kMinCachedBytes are kept, since small ones come from warm heap memory anyway. Setting
// the environment variable FUSED_SEGLOSS_REUSE_GRAD_BUFFERS=0 (read when TF creates the
// kernel) turns reuse off: every call then allocates (the benchmarks' memory probe does
// this, so that the gradient's own allocation is counted in its peak).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "tensorflow/core/framework/tensor.h"

namespace fused_segloss_tf {

class GradientBufferCache {
 public:
  static constexpr int kSlots = 2;
  static constexpr int64_t kMinCachedBytes = int64_t{4} << 20;

  GradientBufferCache() {
    const char* setting = std::getenv("FUSED_SEGLOSS_REUSE_GRAD_BUFFERS");
    enabled_ = setting == nullptr || std::strcmp(setting, "0") != 0;
  }

  // A cached buffer of this dtype and shape that no other tensor references, shared into
  // *out (which then holds a second reference, so no concurrent call can take it too).
  bool TakeIdle(tensorflow::DataType dtype, const tensorflow::TensorShape& shape,
                tensorflow::Tensor* out) {
    if (!enabled_) return false;
    std::lock_guard<std::mutex> lock(mu_);
    for (tensorflow::Tensor& slot : slots_) {
      if (slot.IsInitialized() && slot.dtype() == dtype && slot.shape() == shape &&
          slot.RefCountIsOne()) {
        *out = slot;
        return true;
      }
    }
    return false;
  }

  // Keeps a reference to a freshly allocated output, replacing an idle slot (or the
  // oldest one), when it is large enough to be worth reusing.
  void Remember(const tensorflow::Tensor& fresh) {
    if (!enabled_ || static_cast<int64_t>(fresh.TotalBytes()) < kMinCachedBytes) return;
    std::lock_guard<std::mutex> lock(mu_);
    int victim = next_;
    for (int i = 0; i < kSlots; ++i) {
      if (!slots_[i].IsInitialized() || slots_[i].RefCountIsOne()) {
        victim = i;
        break;
      }
    }
    slots_[victim] = fresh;
    next_ = (victim + 1) % kSlots;
  }

 private:
  bool enabled_ = true;
  std::mutex mu_;
  tensorflow::Tensor slots_[kSlots];
  int next_ = 0;
};

}  // namespace fused_segloss_tf
