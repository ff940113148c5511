// booking_request_from_json on any JSON a client can send (the body of POST /v1/bookings, the
// "book" op), as the gateway calls it: with the authenticated user as override, and without (the
// Python and C++ hosts). It reads the shape (the engine validates ids, line counts and limits), so
// what it accepts must be well-typed, belong to the override user, and survive the booking's JSON
// form (to_json, then booking_from_json) unchanged.
#include "fuzz_check.hpp"

#include <pushbook/booking.hpp>

#include "detail/json_text.hpp"

#include <boost/json/serialize.hpp>

#include <boost/json/parse.hpp>

#include <chrono>

using namespace pushbook;

namespace {

void check_accepted(const BookingRequest& req, std::string_view user_override) {
  FUZZ_CHECK(!req.user.empty());
  if (!user_override.empty()) FUZZ_CHECK(req.user == user_override);
  for (const auto& line : req.lines) FUZZ_CHECK(line.quantity >= 1);
  if (req.hold_for) FUZZ_CHECK(req.hold_for->count() >= 1);

  // The booking the engine would make of it, through its JSON form and back.
  Booking b;
  b.id = "b1";
  b.user = req.user;
  b.lines = req.lines;
  b.metadata = req.metadata;
  b.hold_for = req.hold_for;
  b.created_at = b.updated_at = wall_clock::time_point(std::chrono::milliseconds(1'700'000'000'000));
  auto back = booking_from_json(to_json(b));
  FUZZ_CHECK(back.has_value());
  FUZZ_CHECK(back->user == b.user);
  FUZZ_CHECK(back->lines == b.lines);
  FUZZ_CHECK(back->metadata == b.metadata);
  FUZZ_CHECK(back->hold_for == b.hold_for);
  FUZZ_CHECK(back->created_at == b.created_at);
  // The text the engine publishes for it (written directly, metadata and all) is to_json's.
  FUZZ_CHECK(*detail::json_text(b) == boost::json::serialize(to_json(b)));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  boost::system::error_code ec;
  const auto v = boost::json::parse(pushbook::fuzz::as_text(data, size), ec);
  if (ec) return 0;
  for (std::string_view user_override : {std::string_view{}, std::string_view{"alice"}}) {
    auto req = booking_request_from_json(v, user_override);
    if (req) {
      check_accepted(*req, user_override);
    } else {
      FUZZ_CHECK(req.error().is(errc::bad_request) || req.error().is(errc::forbidden));
      FUZZ_CHECK(!req.error().message.empty());
    }
  }
  // The stored form, read back by durable stores: whatever it accepts serializes back to itself.
  if (auto b = booking_from_json(v)) {
    auto again = booking_from_json(to_json(*b));
    FUZZ_CHECK(again.has_value());
    FUZZ_CHECK(to_json(*again) == to_json(*b));
    FUZZ_CHECK(*detail::json_text(*b) == boost::json::serialize(to_json(*b)));
  }
  return 0;
}
