#include <pushbook/error.hpp>

namespace pushbook {
namespace {

class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "pushbook"; }
  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::bad_request: return "bad request";
      case errc::not_found: return "not found";
      case errc::already_exists: return "already exists";
      case errc::exceeds_capacity: return "quantity exceeds the resource's capacity";
      case errc::idempotency_conflict: return "idempotency key reused with a different request";
      case errc::sold_out: return "sold out";
      case errc::invalid_transition: return "invalid state transition";
      case errc::capacity_in_use: return "capacity is in use";
      case errc::overloaded: return "overloaded";
      case errc::slow_consumer: return "subscriber too slow";
      case errc::invalid_topic: return "invalid topic";
      case errc::shutting_down: return "shutting down";
      case errc::store_failed: return "booking store failed";
      case errc::unauthorized: return "unauthorized";
      case errc::forbidden: return "forbidden";
      case errc::rate_limited: return "rate limited";
      case errc::too_large: return "too large";
      case errc::internal: return "internal error";
      case errc::quota_exceeded: return "quota exceeded";
      case errc::bus_unavailable: return "event bus unavailable";
    }
    return "unknown pushbook error";
  }
};

}  // namespace

const std::error_category& error_category() noexcept {
  static const category instance;
  return instance;
}

const char* to_string(errc e) noexcept {
  switch (e) {
    case errc::bad_request: return "bad_request";
    case errc::not_found: return "not_found";
    case errc::already_exists: return "already_exists";
    case errc::exceeds_capacity: return "exceeds_capacity";
    case errc::idempotency_conflict: return "idempotency_conflict";
    case errc::sold_out: return "sold_out";
    case errc::invalid_transition: return "invalid_transition";
    case errc::capacity_in_use: return "capacity_in_use";
    case errc::overloaded: return "overloaded";
    case errc::slow_consumer: return "slow_consumer";
    case errc::invalid_topic: return "invalid_topic";
    case errc::shutting_down: return "shutting_down";
    case errc::store_failed: return "store_failed";
    case errc::unauthorized: return "unauthorized";
    case errc::forbidden: return "forbidden";
    case errc::rate_limited: return "rate_limited";
    case errc::too_large: return "too_large";
    case errc::internal: return "internal";
    case errc::quota_exceeded: return "quota_exceeded";
    case errc::bus_unavailable: return "bus_unavailable";
  }
  return "internal";
}

}  // namespace pushbook
