#include "gateway/rate_limit.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>

namespace pushbook::detail {

void TokenBucket::refill(clock::time_point now, double rate, double burst) {
  if (now > refilled)
    tokens = std::min(burst, tokens + std::chrono::duration<double>(now - refilled).count() * rate);
  refilled = std::max(refilled, now);
}

bool TokenBucket::take(clock::time_point now, double rate, double burst, double* wait_s) {
  refill(now, rate, burst);
  if (tokens >= 1.0) {
    tokens -= 1.0;
    return true;
  }
  if (wait_s) *wait_s = (1.0 - tokens) / rate;
  return false;
}

UserRateLimiter::UserRateLimiter(double rate, double burst) : rate_(rate), burst_(std::max(1.0, burst)) {}

bool UserRateLimiter::take(std::string_view user, TokenBucket::clock::time_point now, long* retry_after_s) {
  if (rate_ <= 0) return true;
  std::lock_guard lock(mutex_);
  auto it = buckets_.find(user);
  if (it == buckets_.end()) {
    if (buckets_.size() >= sweep_at_) sweep(now);
    it = buckets_.emplace(std::string(user), TokenBucket(burst_, now)).first;
  }
  double wait = 0;
  if (it->second.take(now, rate_, burst_, &wait)) return true;
  if (retry_after_s) *retry_after_s = std::max(1L, static_cast<long>(std::ceil(std::min(wait, 86'400.0))));
  return false;
}

void UserRateLimiter::sweep(TokenBucket::clock::time_point now) {
  for (auto it = buckets_.begin(); it != buckets_.end();) {
    it->second.refill(now, rate_, burst_);
    it = it->second.tokens >= burst_ ? buckets_.erase(it) : std::next(it);
  }
  // Sweep again when the map has doubled from what is left: amortised O(1) per new user.
  sweep_at_ = std::max<std::size_t>(1024, buckets_.size() * 2);
}

std::size_t UserRateLimiter::tracked_users() const {
  std::lock_guard lock(mutex_);
  return buckets_.size();
}

}  // namespace pushbook::detail
