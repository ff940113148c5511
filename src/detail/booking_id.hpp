// Booking ids: 128 bits, Crockford base32 (26 characters, URL-safe, no padding):
//   48 bits Unix milliseconds | 32 bits node id | 48 bits per-node counter.
// Sorting ids sorts bookings by creation time at millisecond resolution; node id and counter make
// them unique across processes (by construction when node ids are assigned, else with the
// probability of a 32-bit random collision per pair of engines, times a counter collision).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

namespace pushbook::detail {

class BookingIdGenerator {
 public:
  explicit BookingIdGenerator(std::uint32_t node_id, std::uint64_t counter_start)
      : node_id_(node_id), counter_(counter_start) {}

  std::string next(std::chrono::system_clock::time_point now = std::chrono::system_clock::now());

  /// A node id from the operating system's random source.
  static std::uint32_t random_node_id();
  static std::uint64_t random_counter_start();

  /// Decodes the millisecond timestamp of an id made here; -1 when malformed.
  static std::int64_t timestamp_ms(const std::string& id);

 private:
  std::uint32_t node_id_;
  std::atomic<std::uint64_t> counter_;
};

}  // namespace pushbook::detail
