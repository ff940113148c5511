// Test helper: a one-line booking request.
#pragma once

#include <pushbook/booking.hpp>

#include <string>

namespace pushbook::test {

/// `quantity` units of `resource` for `user`, with an optional idempotency key.
inline BookingRequest one(std::string user, std::string resource, std::uint32_t quantity = 1,
                          std::string key = {}) {
  BookingRequest r;
  r.user = std::move(user);
  r.lines.push_back({std::move(resource), quantity});
  r.idempotency_key = std::move(key);
  return r;
}

}  // namespace pushbook::test
