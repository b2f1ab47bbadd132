// AdviseHugePages (memory_advice.h): madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior
// of a large buffer, on Linux; a no-op elsewhere.
#include "memory_advice.h"

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_segloss {

void AdviseHugePages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHugePage = std::uintptr_t{2} << 20;
  constexpr std::size_t kMinBytes = std::size_t{4} << 20;
  if (data == nullptr || bytes < kMinBytes) return;
  const auto start = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1);
  const std::uintptr_t last = (start + bytes) & ~(kHugePage - 1);
  if (last <= first) return;
  // The result is ignored on purpose: without THP support the buffer simply keeps 4 KiB
  // pages, which is correct, only slower.
  (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fused_segloss
