#!/bin/bash
# What a first write to fresh memory costs on this machine, in CPU µs per 4 KiB: plain pages, then
# the same memory asked for as transparent huge pages (madvise(MADV_HUGEPAGE), which is what
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1 does for malloc's heap). A pushed booking leaves ~1.8 KB
# on the heap (docs/benchmarks.md, "CPU per booking, session 21"): this is what that growth costs.
#
#   scripts/page-touch-cost.sh [MiB]   (default 160; needs a C compiler)
set -euo pipefail
mib=${1:-160}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/touch.c" <<'EOF'
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
static double cpu(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char** argv) {
  const size_t bytes = (size_t)atoi(argv[1]) << 20, huge = 2u << 20, page = 4096;
  const int thp = atoi(argv[2]);
  char* p = mmap(0, bytes + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return perror("mmap"), 1;
  p = (char*)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
  if (thp && madvise(p, bytes, MADV_HUGEPAGE) != 0) return perror("madvise"), 1;
  const double t0 = cpu();
  for (size_t i = 0; i < bytes; i += page) p[i] = 1;
  printf("%-28s %6.2f us per 4 KiB\n", thp ? "transparent huge pages:" : "4 KiB pages:", (cpu() - t0) / (bytes / page) * 1e6);
  return 0;
}
EOF
cc -O2 -o "$dir/touch" "$dir/touch.c"
echo "first write to $mib MiB of fresh memory (THP mode: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown))"
for run in 1 2 3; do
  "$dir/touch" "$mib" 0
  "$dir/touch" "$mib" 1
done
