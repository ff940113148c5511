#include <pushbook/metrics.hpp>

#include <doctest/doctest.h>

#include <thread>
#include <vector>

using namespace pushbook;

TEST_CASE("values below 64 are exact; larger ones land within 3.2%") {
  for (std::uint64_t v : {0, 1, 17, 63})
    CHECK(LatencyHistogram::value_of(LatencyHistogram::bucket_of(v)) == v);
  for (std::uint64_t v : {64ull, 100ull, 1000ull, 123456ull, 1ull << 40, ~0ull >> 1}) {
    CAPTURE(v);
    const auto r = LatencyHistogram::value_of(LatencyHistogram::bucket_of(v));
    const double err = (static_cast<double>(r) - static_cast<double>(v)) / static_cast<double>(v);
    CHECK(err < 0.032);
    CHECK(err > -0.032);
  }
  CHECK(LatencyHistogram::bucket_of(~0ull) == LatencyHistogram::bucket_count - 1);
}

TEST_CASE("percentiles of a known distribution") {
  LatencyHistogram h;
  for (std::uint64_t v = 1; v <= 100; ++v) h.record(v * 1000);  // 1..100 us
  auto s = h.summary();
  CHECK(s.count == 100);
  CHECK(s.mean_ns == doctest::Approx(50500));
  CHECK(s.max_ns == 100000);
  CHECK(s.p50_ns == doctest::Approx(50000).epsilon(0.032));
  CHECK(s.p99_ns == doctest::Approx(99000).epsilon(0.032));
  CHECK(h.percentile(1.0) == 100000);
  LatencyHistogram empty;
  CHECK(empty.percentile(0.5) == 0);
  CHECK(empty.summary().count == 0);
}

TEST_CASE("merge and reset") {
  LatencyHistogram a, b;
  a.record(10);
  b.record(20);
  b.record(std::chrono::microseconds(5));
  a.merge(b);
  CHECK(a.count() == 3);
  CHECK(a.summary().max_ns == 5000);
  a.reset();
  CHECK(a.count() == 0);
}

TEST_CASE("recording from many threads loses nothing") {
  LatencyHistogram h;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 10000; ++i) h.record(static_cast<std::uint64_t>(i));
    });
  for (auto& t : threads) t.join();
  CHECK(h.count() == 40000);
  CHECK(h.summary().max_ns == 9999);
}
