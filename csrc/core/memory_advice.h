// Page advice for large outputs, framework-free: AdviseHugePages, called by the TF
// gradient kernel and the XLA gradient handler on their logits-sized output buffer.
#pragma once

#include <cstddef>

namespace fused_segloss {

// Asks the OS to back [data, data + bytes) with transparent huge pages (Linux
// madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior; a no-op elsewhere, for buffers
// under 4 MiB, or when the kernel refuses). Why: the gradient is as large as the logits and
// is written exactly once into memory that the allocator usually has just mapped, so every
// 4 KiB page costs a fault, which for a fresh buffer can take longer than the gradient's
// arithmetic. Pages already present are unaffected; the advice is a hint only.
void AdviseHugePages(void* data, std::size_t bytes);

}  // namespace fused_segloss
