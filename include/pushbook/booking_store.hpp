// pushbook/booking_store.hpp: where the engine writes every booking state change before it
// publishes it. MemoryStore keeps them in this process; a durable store (and a transactional
// outbox that publishes from the same transaction) implements the same interface.
#pragma once

#include <pushbook/booking.hpp>
#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace pushbook {

/// An event the engine will publish once a change is stored.
struct OutboxEvent {
  std::string topic;
  std::shared_ptr<const boost::json::value> data;
};

/// One state change of one booking: the booking as it is after the change, and the events that
/// announce it. The engine calls BookingStore::commit(), and publishes `events` only when it
/// succeeds. A store with a transactional outbox may write `events` in the same transaction and
/// publish them itself; see docs/architecture.md.
struct StateChange {
  const Booking& booking;
  std::vector<OutboxEvent> events;
};

/// Persistence of bookings. Called concurrently, but never concurrently for the same booking id
/// (the engine serialises changes per booking).
class PUSHBOOK_EXPORT BookingStore {
 public:
  virtual ~BookingStore();
  /// Stores `change.booking`, replacing the previous version. Errors: errc::store_failed.
  virtual result<void> commit(const StateChange& change) = 0;
  /// The booking with this id, or nullopt.
  virtual std::optional<Booking> load(std::string_view booking_id) const = 0;
};

/// A thread-safe in-memory BookingStore.
class PUSHBOOK_EXPORT MemoryStore final : public BookingStore {
 public:
  MemoryStore();
  ~MemoryStore() override;
  result<void> commit(const StateChange& change) override;
  std::optional<Booking> load(std::string_view booking_id) const override;
  /// Number of bookings stored.
  std::size_t size() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace pushbook
