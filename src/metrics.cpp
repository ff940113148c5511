#include <pushbook/metrics.hpp>

#include <bit>
#include <cmath>

namespace pushbook {

// Values below 2 * sub_buckets are exact; above, each power of two [2^e, 2^(e+1)) is split into
// sub_buckets equal slices.
int LatencyHistogram::bucket_of(std::uint64_t value) noexcept {
  if (value < 2 * sub_buckets) return static_cast<int>(value);
  const int e = std::bit_width(value) - 1;  // >= sub_bucket_bits + 1
  const int shift = e - sub_bucket_bits;
  const int sub = static_cast<int>(value >> shift) - sub_buckets;  // 0 .. sub_buckets-1
  return 2 * sub_buckets + (e - sub_bucket_bits - 1) * sub_buckets + sub;
}

std::uint64_t LatencyHistogram::value_of(int bucket) noexcept {
  if (bucket < 2 * sub_buckets) return static_cast<std::uint64_t>(bucket);
  const int rel = bucket - 2 * sub_buckets;
  const int e = rel / sub_buckets + sub_bucket_bits + 1;
  const int sub = rel % sub_buckets;
  const int shift = e - sub_bucket_bits;
  const std::uint64_t low = static_cast<std::uint64_t>(sub_buckets + sub) << shift;
  return low + ((std::uint64_t{1} << shift) >> 1);
}

void LatencyHistogram::record(std::uint64_t ns) noexcept {
  buckets_[static_cast<std::size_t>(bucket_of(ns))].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(ns, std::memory_order_relaxed);
  auto prev = max_.load(std::memory_order_relaxed);
  while (prev < ns && !max_.compare_exchange_weak(prev, ns, std::memory_order_relaxed)) {
  }
}

std::uint64_t LatencyHistogram::percentile(double q) const noexcept {
  std::uint64_t total = 0;
  for (const auto& b : buckets_) total += b.load(std::memory_order_relaxed);
  if (total == 0) return 0;
  if (q < 0) q = 0;
  if (q >= 1) return max_.load(std::memory_order_relaxed);
  // The smallest value v such that at least q of the samples are <= v.
  auto rank = static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(total)));
  if (rank == 0) rank = 1;
  std::uint64_t seen = 0;
  for (int i = 0; i < bucket_count; ++i) {
    seen += buckets_[static_cast<std::size_t>(i)].load(std::memory_order_relaxed);
    if (seen >= rank) {
      const auto v = value_of(i);
      const auto mx = max_.load(std::memory_order_relaxed);
      return v > mx ? mx : v;
    }
  }
  return max_.load(std::memory_order_relaxed);
}

LatencySummary LatencyHistogram::summary() const noexcept {
  LatencySummary s;
  s.count = count();
  if (s.count == 0) return s;
  s.mean_ns = static_cast<double>(sum_.load(std::memory_order_relaxed)) / static_cast<double>(s.count);
  s.p50_ns = percentile(0.50);
  s.p90_ns = percentile(0.90);
  s.p99_ns = percentile(0.99);
  s.p999_ns = percentile(0.999);
  s.max_ns = max_.load(std::memory_order_relaxed);
  return s;
}

void LatencyHistogram::merge(const LatencyHistogram& other) noexcept {
  for (std::size_t i = 0; i < buckets_.size(); ++i)
    buckets_[i].fetch_add(other.buckets_[i].load(std::memory_order_relaxed), std::memory_order_relaxed);
  count_.fetch_add(other.count(), std::memory_order_relaxed);
  sum_.fetch_add(other.sum_.load(std::memory_order_relaxed), std::memory_order_relaxed);
  const auto omax = other.max_.load(std::memory_order_relaxed);
  auto prev = max_.load(std::memory_order_relaxed);
  while (prev < omax && !max_.compare_exchange_weak(prev, omax, std::memory_order_relaxed)) {
  }
}

void LatencyHistogram::reset() noexcept {
  for (auto& b : buckets_) b.store(0, std::memory_order_relaxed);
  count_.store(0, std::memory_order_relaxed);
  sum_.store(0, std::memory_order_relaxed);
  max_.store(0, std::memory_order_relaxed);
}

}  // namespace pushbook
