// Test helper: the random booking request of the randomised tests (concurrency_test, the
// processes of postgres_cluster_test): one line of 1-3 units on one of `resources`, one time in
// four a second line of 1 unit on the next resource, one time in `hold_one_in` a hold of 5-30 ms.
// `pick(n)` draws 0..n-1 from the test's seeded generator (the draws, and so a replayed seed's
// run, stay in this order).
#pragma once

#include <pushbook/booking.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace pushbook::test {

template <typename Pick>
BookingRequest random_booking(Pick&& pick, const std::string& user, const std::vector<std::string>& resources,
                              int hold_one_in) {
  BookingRequest r;
  r.user = user;
  const auto n = static_cast<int>(resources.size());
  const int first = pick(n);
  r.lines.push_back({resources[static_cast<std::size_t>(first)], static_cast<std::uint32_t>(1 + pick(3))});
  if (pick(4) == 0) r.lines.push_back({resources[static_cast<std::size_t>((first + 1) % n)], 1});
  if (pick(hold_one_in) == 0) r.hold_for = std::chrono::milliseconds(5 + pick(25));
  return r;
}

}  // namespace pushbook::test
