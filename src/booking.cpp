#include <pushbook/booking.hpp>

#include "detail/json_text.hpp"

#include <boost/json/array.hpp>
#include <boost/json/string.hpp>

#include <limits>

namespace pushbook {

const char* to_string(BookingStatus s) noexcept {
  switch (s) {
    case BookingStatus::processing: return "processing";
    case BookingStatus::held: return "held";
    case BookingStatus::confirmed: return "confirmed";
    case BookingStatus::rejected: return "rejected";
    case BookingStatus::cancelled: return "cancelled";
    case BookingStatus::released: return "released";
    case BookingStatus::expired: return "expired";
  }
  return "processing";
}

const char* to_string(RejectReason r) noexcept {
  switch (r) {
    case RejectReason::none: return "none";
    case RejectReason::sold_out: return "sold_out";
    case RejectReason::rejected_by_handler: return "rejected_by_handler";
    case RejectReason::handler_timeout: return "handler_timeout";
    case RejectReason::handler_error: return "handler_error";
    case RejectReason::shutdown: return "shutdown";
    case RejectReason::recovery: return "recovery";
  }
  return "none";
}

std::optional<BookingStatus> parse_booking_status(std::string_view s) noexcept {
  for (auto st :
       {BookingStatus::processing, BookingStatus::held, BookingStatus::confirmed, BookingStatus::rejected,
        BookingStatus::cancelled, BookingStatus::released, BookingStatus::expired})
    if (s == to_string(st)) return st;
  return std::nullopt;
}

bool is_final(BookingStatus s) noexcept {
  return s == BookingStatus::rejected || s == BookingStatus::cancelled || s == BookingStatus::released ||
         s == BookingStatus::expired;
}

bool is_valid_id(std::string_view s) noexcept {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                    c == '_' || c == '.' || c == ':' || c == '@' || c == '+' || c == '=' || c == '~';
    if (!ok) return false;
  }
  return true;
}

namespace {

std::int64_t unix_ms(wall_clock::time_point t) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// A positive integer no larger than `max`, or nullopt (rejects 1.5, "1", -1, true).
std::optional<std::uint64_t> positive_int(const boost::json::value& v, std::uint64_t max) {
  std::uint64_t n;
  if (v.is_int64()) {
    if (v.get_int64() < 1) return std::nullopt;
    n = static_cast<std::uint64_t>(v.get_int64());
  } else if (v.is_uint64()) {
    n = v.get_uint64();
  } else {
    return std::nullopt;
  }
  if (n < 1 || n > max) return std::nullopt;
  return n;
}

result<BookingLine> line_from(const boost::json::object& o, std::string_view where) {
  BookingLine line;
  auto r = o.if_contains("resource");
  if (!r || !r->is_string())
    return Error(errc::bad_request, std::string(where) + ": \"resource\" must be a string");
  line.resource = std::string(r->get_string());
  if (auto q = o.if_contains("quantity")) {
    auto n = positive_int(*q, std::numeric_limits<std::uint32_t>::max());
    if (!n)
      return Error(errc::bad_request, std::string(where) + ": \"quantity\" must be an integer of at least 1");
    line.quantity = static_cast<std::uint32_t>(*n);
  }
  return line;
}

// "lines": an array of {"resource","quantity"} objects; errors name the offending element.
result<std::vector<BookingLine>> lines_from(const boost::json::value& v) {
  if (!v.is_array()) return Error(errc::bad_request, "\"lines\" must be an array");
  std::vector<BookingLine> out;
  out.reserve(v.get_array().size());
  std::size_t i = 0;
  for (const auto& item : v.get_array()) {
    const auto where = "lines[" + std::to_string(i++) + "]";
    if (!item.is_object()) return Error(errc::bad_request, where + " must be an object");
    auto line = line_from(item.get_object(), where);
    if (!line) return line.error();
    out.push_back(std::move(*line));
  }
  return out;
}

}  // namespace

result<BookingRequest> booking_request_from_json(const boost::json::value& v,
                                                 std::string_view user_override) {
  if (!v.is_object()) return Error(errc::bad_request, "a booking request must be a JSON object");
  const auto& o = v.get_object();
  BookingRequest req;

  if (auto u = o.if_contains("user")) {
    if (!u->is_string()) return Error(errc::bad_request, "\"user\" must be a string");
    req.user = std::string(u->get_string());
    if (!user_override.empty() && req.user != user_override)
      return Error(errc::forbidden, "you may book only as yourself ('" + std::string(user_override) + "')");
  }
  if (!user_override.empty()) req.user = std::string(user_override);
  if (req.user.empty()) return Error(errc::bad_request, "\"user\" is required");

  const auto* lines = o.if_contains("lines");
  const auto* resource = o.if_contains("resource");
  if (lines && resource)
    return Error(errc::bad_request, "give either \"lines\" or \"resource\"/\"quantity\", not both");
  if (lines) {
    auto parsed = lines_from(*lines);
    if (!parsed) return parsed.error();
    req.lines = std::move(*parsed);
  } else if (resource) {
    auto line = line_from(o, "request");
    if (!line) return line.error();
    req.lines.push_back(std::move(*line));
  } else {
    return Error(errc::bad_request, "a booking request needs \"lines\" or \"resource\"");
  }

  if (auto k = o.if_contains("idempotency_key"); k && !k->is_null()) {
    if (!k->is_string()) return Error(errc::bad_request, "\"idempotency_key\" must be a string");
    req.idempotency_key = std::string(k->get_string());
  }
  if (auto m = o.if_contains("metadata"); m && !m->is_null()) {
    if (!m->is_object()) return Error(errc::bad_request, "\"metadata\" must be an object");
    req.metadata = m->get_object();
  }
  if (auto h = o.if_contains("hold_ms"); h && !h->is_null()) {
    auto n = positive_int(*h, std::uint64_t{1} << 40);
    if (!n) return Error(errc::bad_request, "\"hold_ms\" must be a positive integer (milliseconds)");
    req.hold_for = std::chrono::milliseconds(static_cast<std::int64_t>(*n));
  }
  return req;
}

boost::json::object to_json(const Booking& b) {
  // detail::append_json writes the same text directly (the engine's event payloads): a member
  // added here is added there, in the same place (booking_test compares the two).
  const boost::json::storage_ptr sp;
  boost::json::object o(sp);
  o.reserve(7 + (b.reason != RejectReason::none) + !b.reason_message.empty() + !b.metadata.empty() +
            b.hold_for.has_value() + b.expires_at.has_value());
  o["booking_id"] = b.id;
  o["status"] = to_string(b.status);
  if (b.reason != RejectReason::none) o["reason"] = to_string(b.reason);
  if (!b.reason_message.empty()) o["reason_message"] = b.reason_message;
  o["user"] = b.user;
  boost::json::array lines(sp);
  lines.reserve(b.lines.size());
  for (const auto& l : b.lines)
    lines.push_back(
        boost::json::object({{"resource", l.resource}, {"quantity", std::int64_t{l.quantity}}}, sp));
  o["lines"] = std::move(lines);
  if (!b.metadata.empty()) o["metadata"] = b.metadata;
  if (b.hold_for) o["hold_ms"] = b.hold_for->count();
  o["version"] = static_cast<std::int64_t>(b.version);
  o["created_at"] = unix_ms(b.created_at);
  o["updated_at"] = unix_ms(b.updated_at);
  if (b.expires_at) o["expires_at"] = unix_ms(*b.expires_at);
  return o;
}

namespace {

// Lists every RejectReason: booking_test round-trips each one, so a new reason missing here fails.
std::optional<RejectReason> parse_reject_reason(std::string_view s) noexcept {
  for (auto r : {RejectReason::none, RejectReason::sold_out, RejectReason::rejected_by_handler,
                 RejectReason::handler_timeout, RejectReason::handler_error, RejectReason::shutdown,
                 RejectReason::recovery})
    if (s == to_string(r)) return r;
  return std::nullopt;
}

// An integer that fits in int64 (rejects 1.5, "1", true and uint64 values above INT64_MAX).
std::optional<std::int64_t> int64_of(const boost::json::value& v) {
  if (v.is_int64()) return v.get_int64();
  if (v.is_uint64() && v.get_uint64() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
    return static_cast<std::int64_t>(v.get_uint64());
  return std::nullopt;
}

// Unix milliseconds as a wall-clock time; nullopt when not an integer or out of the clock's range
// (system_clock counts nanoseconds on Linux: about +-292 years around 1970).
std::optional<wall_clock::time_point> unix_ms_time(const boost::json::value& v) {
  constexpr auto max_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(wall_clock::duration::max()).count();
  auto ms = int64_of(v);
  if (!ms || *ms > max_ms || *ms < -max_ms) return std::nullopt;
  return wall_clock::time_point(
      std::chrono::duration_cast<wall_clock::duration>(std::chrono::milliseconds(*ms)));
}

result<std::string> string_field(const boost::json::object& o, std::string_view name, bool required) {
  const auto* v = o.if_contains(name);
  if (!v || v->is_null()) {
    if (required) return Error(errc::bad_request, "\"" + std::string(name) + "\" is required");
    return std::string();
  }
  if (!v->is_string()) return Error(errc::bad_request, "\"" + std::string(name) + "\" must be a string");
  return std::string(v->get_string());
}

result<wall_clock::time_point> time_field(const boost::json::value* v, std::string_view name) {
  if (!v) return Error(errc::bad_request, "\"" + std::string(name) + "\" is required");
  auto t = unix_ms_time(*v);
  if (!t)
    return Error(errc::bad_request, "\"" + std::string(name) + "\" must be an integer (Unix milliseconds)");
  return *t;
}

}  // namespace

result<Booking> booking_from_json(const boost::json::value& v) {
  if (!v.is_object()) return Error(errc::bad_request, "a booking must be a JSON object");
  const auto& o = v.get_object();
  Booking b;

  auto id = string_field(o, "booking_id", true);
  if (!id) return id.error();
  b.id = std::move(*id);
  auto user = string_field(o, "user", true);
  if (!user) return user.error();
  b.user = std::move(*user);

  auto status = string_field(o, "status", true);
  if (!status) return status.error();
  auto st = parse_booking_status(*status);
  if (!st) return Error(errc::bad_request, "\"status\" must be a booking status, not '" + *status + "'");
  b.status = *st;

  auto reason = string_field(o, "reason", false);
  if (!reason) return reason.error();
  if (!reason->empty()) {
    auto r = parse_reject_reason(*reason);
    if (!r) return Error(errc::bad_request, "\"reason\" must be a reject reason, not '" + *reason + "'");
    b.reason = *r;
  }
  auto message = string_field(o, "reason_message", false);
  if (!message) return message.error();
  b.reason_message = std::move(*message);

  const auto* lines = o.if_contains("lines");
  if (!lines) return Error(errc::bad_request, "\"lines\" is required");
  auto parsed = lines_from(*lines);
  if (!parsed) return parsed.error();
  b.lines = std::move(*parsed);

  if (auto m = o.if_contains("metadata"); m && !m->is_null()) {
    if (!m->is_object()) return Error(errc::bad_request, "\"metadata\" must be an object");
    b.metadata = m->get_object();
  }
  if (auto h = o.if_contains("hold_ms"); h && !h->is_null()) {
    auto ms = int64_of(*h);
    if (!ms) return Error(errc::bad_request, "\"hold_ms\" must be an integer (milliseconds)");
    b.hold_for = std::chrono::milliseconds(*ms);
  }

  const auto* version = o.if_contains("version");
  if (!version) return Error(errc::bad_request, "\"version\" is required");
  auto n = positive_int(*version, static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()));
  if (!n) return Error(errc::bad_request, "\"version\" must be an integer of at least 1");
  b.version = *n;

  auto created = time_field(o.if_contains("created_at"), "created_at");
  if (!created) return created.error();
  b.created_at = *created;
  auto updated = time_field(o.if_contains("updated_at"), "updated_at");
  if (!updated) return updated.error();
  b.updated_at = *updated;
  if (auto e = o.if_contains("expires_at"); e && !e->is_null()) {
    auto expires = time_field(e, "expires_at");
    if (!expires) return expires.error();
    b.expires_at = *expires;
  }
  return b;
}

boost::json::object to_json(const ResourceState& r) {
  // Counts as signed integers: what JSON consumers (JavaScript, Python) expect of a number.
  // detail::append_json writes the same text directly.
  const boost::json::storage_ptr sp;
  return boost::json::object({{"resource", r.id},
                              {"capacity", std::int64_t{r.capacity}},
                              {"available", std::int64_t{r.available()}},
                              {"reserved", std::int64_t{r.reserved}},
                              {"confirmed", std::int64_t{r.confirmed}}},
                             sp);
}

}  // namespace pushbook
