// pushbook/booking.hpp: the booking data model shared by the engine, the store and the gateway.
#pragma once

#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pushbook {

using wall_clock = std::chrono::system_clock;

/// The states of a booking. Allowed transitions:
///   processing -> confirmed | rejected | held
///   held       -> confirmed | released | expired
///   confirmed  -> cancelled
enum class BookingStatus { processing, held, confirmed, rejected, cancelled, released, expired };

/// Why a booking was rejected.
enum class RejectReason {
  none,
  /// Not enough units were free when it was decided.
  sold_out,
  /// The host's handler declined it.
  rejected_by_handler,
  /// The host's handler did not answer within the engine's handler timeout.
  handler_timeout,
  /// The host's handler threw.
  handler_error,
  /// The engine shut down before deciding it.
  shutdown,
  /// Found undecided after a restart, with EngineOptions::recovery = RecoveryPolicy::reject.
  recovery,
};

PUSHBOOK_EXPORT const char* to_string(BookingStatus s) noexcept;
PUSHBOOK_EXPORT const char* to_string(RejectReason r) noexcept;
PUSHBOOK_EXPORT std::optional<BookingStatus> parse_booking_status(std::string_view s) noexcept;
/// True for states no transition leaves (rejected, cancelled, released, expired).
PUSHBOOK_EXPORT bool is_final(BookingStatus s) noexcept;
/// True when the booking has been decided (anything but processing).
inline bool is_decided(BookingStatus s) noexcept { return s != BookingStatus::processing; }

/// One line of a booking: `quantity` units of `resource`.
struct BookingLine {
  std::string resource;
  std::uint32_t quantity = 1;
  friend bool operator==(const BookingLine&, const BookingLine&) = default;
};

/// What a client asks for. All lines are booked, or none.
struct BookingRequest {
  std::string user;
  std::vector<BookingLine> lines;
  /// Optional. The same key from the same user with the same request returns the same booking.
  std::string idempotency_key;
  /// Optional; passed through unchanged to the booking and its events.
  boost::json::object metadata;
  /// Optional: ask for a hold (two-phase booking) that lasts this long once granted.
  std::optional<std::chrono::milliseconds> hold_for;
};

/// Parses a request from its JSON form:
///   {"user":"u1","lines":[{"resource":"r","quantity":1}],"idempotency_key":"k",
///    "metadata":{...},"hold_ms":60000}
/// or the one-line shorthand {"user":"u1","resource":"r","quantity":1}. "quantity" defaults to 1.
/// `user` may be omitted from the JSON and given as `user_override` (a gateway passes the
/// authenticated user). Errors: errc::bad_request naming the field.
PUSHBOOK_EXPORT result<BookingRequest> booking_request_from_json(const boost::json::value& v,
                                                                 std::string_view user_override = {});

/// The answer submit() gives at once.
struct Ack {
  std::string booking_id;
  BookingStatus status = BookingStatus::processing;
  /// True when this is an idempotent retry answered with an existing booking.
  bool replayed = false;
  /// The booking's version this ACK reports (Booking::version): 1 for a new booking, the stored
  /// version for a replay. Also the seq of that version's event on "booking/<id>", so a client
  /// can subscribe with since_seq = version to get exactly the changes that follow.
  std::uint64_t version = 1;
};

/// A booking and its current state.
struct Booking {
  std::string id;
  std::string user;
  std::vector<BookingLine> lines;
  boost::json::object metadata;
  std::string idempotency_key;
  BookingStatus status = BookingStatus::processing;
  RejectReason reason = RejectReason::none;
  /// Free text explaining the reason (e.g. the handler's message).
  std::string reason_message;
  std::optional<std::chrono::milliseconds> hold_for;
  /// Set while held: when the hold expires.
  std::optional<wall_clock::time_point> expires_at;
  wall_clock::time_point created_at;
  wall_clock::time_point updated_at;
  /// Number of state changes so far: 1 for processing, then +1 per transition.
  std::uint64_t version = 1;
  /// Which run of the business step (BookingHandler) this is: 1 the first time; more when the
  /// handler may have run before for this booking and been cut off (a restart recovered it, or
  /// another process took it over: PostgresStore counts every claim; other stores say 2 after a
  /// restart). A host whose side effect must happen once keys it on the booking id. Set for the
  /// handler; not part of the JSON.
  std::uint32_t attempt = 0;
};

/// The JSON form used in events and by the gateway:
///   {"booking_id","status","reason"?,"reason_message"?,"user","lines":[...],"metadata",
///    "version","created_at","updated_at","expires_at"?}   (times in Unix milliseconds)
PUSHBOOK_EXPORT boost::json::object to_json(const Booking& b);

/// The inverse of to_json(const Booking&), for stores that keep a booking in its JSON form. Times
/// come back at millisecond precision; `idempotency_key` is not part of the JSON and stays empty.
/// Errors: errc::bad_request naming the field.
PUSHBOOK_EXPORT result<Booking> booking_from_json(const boost::json::value& v);

/// Capacity and use of one resource. available = capacity - reserved - confirmed.
struct ResourceState {
  std::string id;
  std::uint32_t capacity = 0;
  /// Units held by bookings being decided or in a hold. In the counts a store reports
  /// (BookingStore::on_resource_counts: PostgresStore's rows, which resource events then carry)
  /// only holds: a booking being decided takes units in the database with its decision.
  std::uint32_t reserved = 0;
  std::uint32_t confirmed = 0;
  /// How many times the store changed this resource (capacity or units), when the store numbers
  /// them (PostgresStore: BookingStore::on_resource_counts); 0 otherwise. Not in to_json: events
  /// carry it as their seq.
  std::uint64_t version = 0;
  std::uint32_t available() const noexcept {
    const auto used = reserved + confirmed;
    return used >= capacity ? 0 : capacity - used;
  }
};

/// {"resource","capacity","available","reserved","confirmed"}
PUSHBOOK_EXPORT boost::json::object to_json(const ResourceState& r);

/// Whether `s` may be a user, resource or idempotency-key id: 1..128 characters of letters,
/// digits and "-_.:@+=~" (so it can be a topic segment and a URL path segment as it is).
PUSHBOOK_EXPORT bool is_valid_id(std::string_view s) noexcept;

}  // namespace pushbook
