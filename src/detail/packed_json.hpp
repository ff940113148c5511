// JSON the library keeps for a while (an event's payload, held by the bus's history) in one block
// sized for it, instead of an allocation per element.
//
// A booking's JSON is ~25 elements: with the default memory resource every key, string, array and
// object table is an allocation of its own, rounded up by malloc and with its header (864 bytes
// for a one-line booking, measured), kept twice per booking for as long as the bus keeps the
// booking's events. Built here, it is made in the thread's scratch arena (no allocation), then
// copied into one block of the bytes it takes (690 bytes for the same booking).
#pragma once

#include <pushbook/booking.hpp>

#include <boost/json/object.hpp>
#include <boost/json/storage_ptr.hpp>
#include <boost/json/value.hpp>

#include <memory>

namespace pushbook::detail {

/// The thread's scratch arena: JSON made in it lives until the ScratchJson is destroyed, and
/// `needed()` says how many bytes a copy of everything made in it takes at most. Not for nesting
/// (a ScratchJson made while another is alive on the thread uses the heap instead).
class ScratchJson {
 public:
  ScratchJson();
  ~ScratchJson();
  ScratchJson(const ScratchJson&) = delete;
  ScratchJson& operator=(const ScratchJson&) = delete;

  /// The storage to make the JSON with.
  const boost::json::storage_ptr& storage() const noexcept { return storage_; }
  /// Bytes allocated through storage() so far, laid out one after the other with their alignment.
  std::size_t needed() const noexcept;

 private:
  struct counting;
  std::unique_ptr<counting> counting_;
  boost::json::storage_ptr storage_;
  bool owns_block_ = false;
};

/// An immutable copy of `v` in one block of its size (plus the shared pointer's own allocation).
/// `needed`: an upper bound of the bytes the copy takes (ScratchJson::needed() of where `v` was
/// made). The value is thread-safe to read, and to copy: copies made later (any thread) and
/// anything allocated for them come from the heap, and they keep the block alive as long as they
/// use it.
std::shared_ptr<const boost::json::value> packed_copy(const boost::json::value& v, std::size_t needed);

/// to_json() of booking.hpp with its memory from `sp`.
boost::json::object to_json(const Booking& b, boost::json::storage_ptr sp);
boost::json::object to_json(const ResourceState& r, boost::json::storage_ptr sp);

/// to_json(), packed (packed_copy): the payload of a booking's or a resource's events.
std::shared_ptr<const boost::json::value> packed_json(const Booking& b);
std::shared_ptr<const boost::json::value> packed_json(const ResourceState& r);

}  // namespace pushbook::detail
