// pushbook/metrics.hpp: lock-free latency histograms used by the engine's counters, the gateway's
// metrics and the benchmarks.
#pragma once

#include <pushbook/export.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace pushbook {

/// Percentiles of a histogram at one moment. Times in nanoseconds.
struct LatencySummary {
  std::uint64_t count = 0;
  double mean_ns = 0;
  std::uint64_t p50_ns = 0;
  std::uint64_t p90_ns = 0;
  std::uint64_t p99_ns = 0;
  std::uint64_t p999_ns = 0;
  std::uint64_t max_ns = 0;
};

/// A log-linear histogram of durations (HDR-style: 32 sub-buckets per power of two, so any
/// recorded value is reported within 3.2% of itself). Recording is wait-free and thread-safe.
class PUSHBOOK_EXPORT LatencyHistogram {
 public:
  static constexpr int sub_bucket_bits = 5;
  static constexpr int sub_buckets = 1 << sub_bucket_bits;
  static constexpr int bucket_count = 2 * sub_buckets + (63 - sub_bucket_bits) * sub_buckets;

  LatencyHistogram() = default;
  LatencyHistogram(const LatencyHistogram&) = delete;
  LatencyHistogram& operator=(const LatencyHistogram&) = delete;

  void record(std::uint64_t nanoseconds) noexcept;
  void record(std::chrono::nanoseconds d) noexcept {
    record(d.count() < 0 ? 0 : static_cast<std::uint64_t>(d.count()));
  }

  std::uint64_t count() const noexcept { return count_.load(std::memory_order_relaxed); }
  /// The value at quantile `q` in [0, 1] (0.99 for p99); 0 when empty.
  std::uint64_t percentile(double q) const noexcept;
  LatencySummary summary() const noexcept;
  /// Adds every sample of `other` to this one.
  void merge(const LatencyHistogram& other) noexcept;
  void reset() noexcept;

  /// The bucket of a value, and the representative value of a bucket (its midpoint).
  static int bucket_of(std::uint64_t value) noexcept;
  static std::uint64_t value_of(int bucket) noexcept;

 private:
  std::array<std::atomic<std::uint64_t>, bucket_count> buckets_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> sum_{0};
  std::atomic<std::uint64_t> max_{0};
};

}  // namespace pushbook
