// Token buckets for the gateway's rate limits: one for the whole gateway (new demo users) and one
// per user for HTTP requests. No I/O here.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "detail/string_hash.hpp"

namespace pushbook::detail {

/// A token bucket: `rate` tokens a second up to `burst`; a request takes one.
struct TokenBucket {
  using clock = std::chrono::steady_clock;
  double tokens;
  clock::time_point refilled;

  TokenBucket(double burst, clock::time_point now) : tokens(burst), refilled(now) {}
  void refill(clock::time_point now, double rate, double burst);
  /// Takes a token if one is there; otherwise says how long until one is (seconds).
  bool take(clock::time_point now, double rate, double burst, double* wait_s = nullptr);
};

/// One TokenBucket per user. A full bucket is the same as none, so buckets full again are swept
/// when the map has doubled since the last sweep: memory is at most about twice the users active
/// within burst/rate seconds (and 1,024 buckets), not every user ever seen. Thread-safe.
class UserRateLimiter {
 public:
  /// rate <= 0: no limit.
  UserRateLimiter(double rate, double burst);
  /// True when `user` may make one more request at `now`; otherwise false, and `retry_after_s`
  /// (when given) says in how many whole seconds (at least 1) it may.
  bool take(std::string_view user, TokenBucket::clock::time_point now, long* retry_after_s = nullptr);
  std::size_t tracked_users() const;

 private:
  void sweep(TokenBucket::clock::time_point now);  // mutex_ held

  const double rate_;
  const double burst_;
  mutable std::mutex mutex_;
  std::unordered_map<std::string, TokenBucket, detail::string_hash, std::equal_to<>> buckets_;
  std::size_t sweep_at_ = 1024;  // sweep when the map grows past this
};

}  // namespace pushbook::detail
