// Builds a RecoveredState the same way for every store: capacities from the resource rows, and
// reserved/confirmed recomputed from the bookings (never from a stored counter).
#pragma once

#include <pushbook/booking_store.hpp>

#include <map>
#include <string>

namespace pushbook::detail {

struct RecoveryBuilder {
  RecoveredState state;
  std::map<std::string, ResourceState, std::less<>> resources;

  void resource(std::string_view id, std::uint32_t capacity) {
    auto& r = resources[std::string(id)];
    r.id = std::string(id);
    r.capacity = capacity;
  }

  // Counts one booking's units: a held booking's are reserved, a confirmed one's confirmed; a
  // processing booking holds none (recovery decides it again), a final one none either.
  void booking_lines(BookingStatus status, const std::vector<BookingLine>& lines) {
    if (status != BookingStatus::held && status != BookingStatus::confirmed) return;
    for (const auto& l : lines) {
      auto& r = resources[l.resource];
      r.id = l.resource;  // a booking of a resource without a row still counts (capacity 0)
      (status == BookingStatus::held ? r.reserved : r.confirmed) += l.quantity;
    }
  }

  RecoveredState finish() {
    state.resources.clear();
    for (auto& [id, r] : resources) state.resources.push_back(std::move(r));
    return std::move(state);
  }
};

}  // namespace pushbook::detail
