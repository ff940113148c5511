#include <pushbook/booking.hpp>

#include "detail/booking_id.hpp"
#include "detail/json_text.hpp"

#include <pushbook/event_bus.hpp>

#include <doctest/doctest.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <set>
#include <thread>
#include <vector>

using namespace pushbook;

namespace {
result<BookingRequest> parse(std::string_view text, std::string_view user = {}) {
  return booking_request_from_json(boost::json::parse(text), user);
}
}  // namespace

TEST_CASE("a booking request parses from JSON, with lines or the one-line shorthand") {
  auto r = parse(R"({"user":"u1","lines":[{"resource":"room-1","quantity":2},{"resource":"room-2"}],
                     "idempotency_key":"k1","metadata":{"note":"x"},"hold_ms":60000})")
               .value();
  CHECK(r.user == "u1");
  CHECK(r.lines == std::vector<BookingLine>{{"room-1", 2}, {"room-2", 1}});
  CHECK(r.idempotency_key == "k1");
  CHECK(boost::json::serialize(r.metadata) == R"({"note":"x"})");
  CHECK(r.hold_for == std::chrono::milliseconds(60000));

  auto s = parse(R"({"user":"u1","resource":"room-101","quantity":1})").value();
  CHECK(s.lines == std::vector<BookingLine>{{"room-101", 1}});
  CHECK_FALSE(s.hold_for.has_value());
}

TEST_CASE("a user override fills in the authenticated user and refuses another one") {
  auto r = parse(R"({"resource":"r"})", "alice").value();
  CHECK(r.user == "alice");
  auto other = parse(R"({"user":"bob","resource":"r"})", "alice");
  CHECK(other.error().is(errc::forbidden));
  CHECK(other.error().message == "you may book only as yourself ('alice')");
}

TEST_CASE("malformed booking requests name the offending field") {
  struct Case {
    const char* json;
    const char* message;
  };
  for (auto c : {
           Case{R"([1,2])", "a booking request must be a JSON object"},
           Case{R"({"resource":"r"})", "\"user\" is required"},
           Case{R"({"user":5,"resource":"r"})", "\"user\" must be a string"},
           Case{R"({"user":"u"})", "a booking request needs \"lines\" or \"resource\""},
           Case{R"({"user":"u","lines":{}})", "\"lines\" must be an array"},
           Case{R"({"user":"u","lines":[3]})", "lines[0] must be an object"},
           Case{R"({"user":"u","lines":[{"quantity":1}]})", "lines[0]: \"resource\" must be a string"},
           Case{R"({"user":"u","lines":[{"resource":"r","quantity":1.5}]})",
                "lines[0]: \"quantity\" must be an integer of at least 1"},
           Case{R"({"user":"u","lines":[{"resource":"r","quantity":-1}]})",
                "lines[0]: \"quantity\" must be an integer of at least 1"},
           Case{R"({"user":"u","lines":[{"resource":"r","quantity":99999999999}]})",
                "lines[0]: \"quantity\" must be an integer of at least 1"},
           Case{R"({"user":"u","resource":"r","lines":[]})",
                "give either \"lines\" or \"resource\"/\"quantity\", not both"},
           Case{R"({"user":"u","resource":"r","quantity":"2"})",
                "request: \"quantity\" must be an integer of at least 1"},
           Case{R"({"user":"u","resource":"r","idempotency_key":7})", "\"idempotency_key\" must be a string"},
           Case{R"({"user":"u","resource":"r","metadata":[]})", "\"metadata\" must be an object"},
           Case{R"({"user":"u","resource":"r","hold_ms":0})",
                "\"hold_ms\" must be a positive integer (milliseconds)"},
       }) {
    CAPTURE(c.json);
    auto r = parse(c.json);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().is(errc::bad_request));
    CHECK(r.error().message == c.message);
  }
}

TEST_CASE("a booking serializes to the JSON its events carry") {
  Booking b;
  b.id = "01ABC";
  b.user = "u1";
  b.lines = {{"room-1", 2}};
  b.status = BookingStatus::rejected;
  b.reason = RejectReason::sold_out;
  b.reason_message = "'room-1' has 1 of 2 units free";
  b.version = 2;
  b.created_at = wall_clock::time_point(std::chrono::milliseconds(1700000000000));
  b.updated_at = wall_clock::time_point(std::chrono::milliseconds(1700000000250));
  CHECK(boost::json::serialize(to_json(b)) ==
        R"({"booking_id":"01ABC","status":"rejected","reason":"sold_out",)"
        R"("reason_message":"'room-1' has 1 of 2 units free","user":"u1",)"
        R"("lines":[{"resource":"room-1","quantity":2}],"version":2,)"
        R"("created_at":1700000000000,"updated_at":1700000000250})");
  ResourceState r{"room-1", 5, 1, 2};
  CHECK(r.available() == 2);
  CHECK(boost::json::serialize(to_json(r)) ==
        R"({"resource":"room-1","capacity":5,"available":2,"reserved":1,"confirmed":2})");
}

TEST_CASE("booking_from_json reads back what to_json wrote, field by field") {
  using std::chrono::milliseconds;
  Booking b;
  b.id = "01HZY3";
  b.user = "u1";
  b.lines = {{"room-1", 2}, {"room-2", 1}};
  b.metadata = boost::json::parse(R"({"note":"x","n":[1,2]})").as_object();
  b.status = BookingStatus::held;
  b.reason = RejectReason::handler_timeout;
  b.reason_message = "no answer in 5 s";
  b.hold_for = milliseconds(60000);
  b.expires_at = wall_clock::time_point(milliseconds(1700000060250));
  b.created_at = wall_clock::time_point(milliseconds(1700000000000));
  b.updated_at = wall_clock::time_point(milliseconds(1700000000250));
  b.version = 7;

  auto back = booking_from_json(to_json(b)).value();
  CHECK(back.id == "01HZY3");
  CHECK(back.user == "u1");
  CHECK(back.lines == std::vector<BookingLine>{{"room-1", 2}, {"room-2", 1}});
  CHECK(boost::json::serialize(back.metadata) == R"({"note":"x","n":[1,2]})");
  CHECK(back.idempotency_key.empty());  // not part of the wire form
  CHECK(back.status == BookingStatus::held);
  CHECK(back.reason == RejectReason::handler_timeout);
  CHECK(back.reason_message == "no answer in 5 s");
  CHECK(back.hold_for == milliseconds(60000));
  CHECK(back.expires_at == wall_clock::time_point(milliseconds(1700000060250)));
  CHECK(back.created_at == wall_clock::time_point(milliseconds(1700000000000)));
  CHECK(back.updated_at == wall_clock::time_point(milliseconds(1700000000250)));
  CHECK(back.version == 7);
  CHECK(boost::json::serialize(to_json(back)) == boost::json::serialize(to_json(b)));

  // Every status and reason by its name. (A new enumerator belongs in this list: the compiler's
  // -Wswitch in to_string() flags it there, this list must follow.)
  for (auto status :
       {BookingStatus::processing, BookingStatus::held, BookingStatus::confirmed, BookingStatus::rejected,
        BookingStatus::cancelled, BookingStatus::released, BookingStatus::expired}) {
    b.status = status;
    CHECK(booking_from_json(to_json(b)).value().status == status);
  }
  for (auto reason : {RejectReason::none, RejectReason::sold_out, RejectReason::rejected_by_handler,
                      RejectReason::handler_timeout, RejectReason::handler_error, RejectReason::shutdown,
                      RejectReason::recovery}) {
    b.reason = reason;
    CHECK(booking_from_json(to_json(b)).value().reason == reason);
  }

  // The optional fields absent: they come back absent.
  Booking plain;
  plain.id = "01HZY4";
  plain.user = "u2";
  plain.lines = {{"r", 1}};
  auto p = booking_from_json(to_json(plain)).value();
  CHECK(p.status == BookingStatus::processing);
  CHECK(p.reason == RejectReason::none);
  CHECK(p.reason_message.empty());
  CHECK(p.metadata.empty());
  CHECK_FALSE(p.hold_for.has_value());
  CHECK_FALSE(p.expires_at.has_value());
  CHECK(p.version == 1);
  CHECK(p.created_at == wall_clock::time_point());
}

TEST_CASE("booking_from_json rejects malformed bookings naming the field") {
  struct Case {
    const char* json;
    const char* message;
  };
  // Valid but for the one field each case breaks.
  const std::string base = R"("user":"u","lines":[{"resource":"r","quantity":1}],"version":1,)"
                           R"("created_at":1700000000000,"updated_at":1700000000000)";
  for (auto c : {
           Case{R"([1])", "a booking must be a JSON object"},
           Case{R"({"status":"held",@})", "\"booking_id\" is required"},
           Case{R"({"booking_id":5,"status":"held",@})", "\"booking_id\" must be a string"},
           Case{R"({"booking_id":"b",@})", "\"status\" is required"},
           Case{R"({"booking_id":"b","status":"paid",@})", "\"status\" must be a booking status, not 'paid'"},
           Case{R"({"booking_id":"b","status":"rejected","reason":"bored",@})",
                "\"reason\" must be a reject reason, not 'bored'"},
           Case{R"({"booking_id":"b","status":"rejected","reason_message":3,@})",
                "\"reason_message\" must be a string"},
           Case{R"({"booking_id":"b","status":"held","user":"u","version":1,"created_at":1,"updated_at":1})",
                "\"lines\" is required"},
           Case{R"({"booking_id":"b","status":"held","user":"u","lines":[{"resource":"r","quantity":0}],)"
                R"("version":1,"created_at":1,"updated_at":1})",
                "lines[0]: \"quantity\" must be an integer of at least 1"},
           Case{R"({"booking_id":"b","status":"held","metadata":"x",@})", "\"metadata\" must be an object"},
           Case{R"({"booking_id":"b","status":"held","hold_ms":1.5,@})",
                "\"hold_ms\" must be an integer (milliseconds)"},
           Case{R"({"booking_id":"b","status":"held","user":"u","lines":[],"version":0,"created_at":1,)"
                R"("updated_at":1})",
                "\"version\" must be an integer of at least 1"},
           Case{R"({"booking_id":"b","status":"held","user":"u","lines":[],"version":1,"updated_at":1})",
                "\"created_at\" is required"},
           Case{R"({"booking_id":"b","status":"held","user":"u","lines":[],"version":1,"created_at":"1",)"
                R"("updated_at":1})",
                "\"created_at\" must be an integer (Unix milliseconds)"},
           Case{R"({"booking_id":"b","status":"held","user":"u","lines":[],"version":1,"created_at":1,)"
                R"("updated_at":99999999999999999})",
                "\"updated_at\" must be an integer (Unix milliseconds)"},
           Case{R"({"booking_id":"b","status":"held","expires_at":true,@})",
                "\"expires_at\" must be an integer (Unix milliseconds)"},
       }) {
    std::string json = c.json;
    if (auto at = json.find('@'); at != std::string::npos) json.replace(at, 1, base);
    CAPTURE(json);
    auto r = booking_from_json(boost::json::parse(json));
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().is(errc::bad_request));
    CHECK(r.error().message == c.message);
  }
}

TEST_CASE("statuses and reasons have stable names") {
  CHECK(std::string(to_string(BookingStatus::processing)) == "processing");
  CHECK(std::string(to_string(BookingStatus::expired)) == "expired");
  CHECK(std::string(to_string(RejectReason::handler_timeout)) == "handler_timeout");
  CHECK(parse_booking_status("held") == BookingStatus::held);
  CHECK_FALSE(parse_booking_status("nope").has_value());
  CHECK(is_final(BookingStatus::cancelled));
  CHECK_FALSE(is_final(BookingStatus::confirmed));
  CHECK(is_valid_id("alice@example.com"));
  CHECK_FALSE(is_valid_id("a/b"));
  CHECK_FALSE(is_valid_id(""));
}

TEST_CASE("booking ids: 26 Crockford base32 characters carrying time, node and counter") {
  detail::BookingIdGenerator gen(0x12345678, 0);
  const auto t = wall_clock::time_point(std::chrono::milliseconds(1700000000123));
  auto a = gen.next(t);
  auto b = gen.next(t);
  CHECK(a.size() == 26);
  CHECK(a != b);
  CHECK(a < b);  // same millisecond: the counter orders them
  CHECK(detail::BookingIdGenerator::timestamp_ms(a) == 1700000000123);
  CHECK(detail::BookingIdGenerator::timestamp_ms("not-an-id") == -1);
  auto later = gen.next(t + std::chrono::milliseconds(1));
  CHECK(later > b);
  detail::BookingIdGenerator other(0x12345679, 0);
  CHECK(other.next(t) != a);  // another node, same time and counter
  std::set<std::string> many;
  for (int i = 0; i < 10000; ++i) many.insert(gen.next());
  CHECK(many.size() == 10000);
}

namespace {
Booking sample_booking(std::size_t metadata_bytes = 0) {
  Booking b;
  b.id = "0000000000000001-abcdefgh1234";
  b.user = "alice";
  b.lines = {{"hall", 2}, {"room-101", 1}};
  b.status = BookingStatus::rejected;
  b.reason = RejectReason::sold_out;
  b.reason_message = "no \"room\" left";
  b.metadata = {{"note", "window seat"}, {"big", std::string(metadata_bytes, 'x')}};
  b.version = 2;
  b.created_at = b.updated_at = wall_clock::time_point(std::chrono::milliseconds(1'700'000'000'000));
  return b;
}
}  // namespace

TEST_CASE("a booking's event text (json_text) is boost::json::serialize(to_json(b)) byte for byte") {
  // The engine publishes this text and the bus keeps it: it must be the JSON to_json describes.
  std::vector<Booking> cases;
  for (const std::size_t metadata : {std::size_t{0}, std::size_t{100}, std::size_t{20'000}})
    cases.push_back(sample_booking(metadata));
  Booking plain;  // no reason, no metadata, no hold, no line
  plain.id = "b-1";
  plain.user = "bob";
  plain.status = BookingStatus::processing;
  plain.version = 1;
  cases.push_back(plain);
  Booking odd = sample_booking();
  odd.user = std::string("tab\there \"quoted\" back\\slash \x01\x1f ctrl, caf\xc3\xa9 \xe2\x82\xac");
  odd.reason = RejectReason::rejected_by_handler;
  odd.reason_message = "line\nbreak\r\f\b";
  odd.metadata = boost::json::parse(R"({"n":-1,"u":18446744073709551615,"d":1.5e300,"f":0.1,"t":true,)"
                                    R"("z":null,"a":[1,"two",{"three":[]}],"o":{},"s":"\u00e9\"\n"})")
                     .as_object();
  odd.hold_for = std::chrono::milliseconds(90'000);
  odd.expires_at = odd.created_at + std::chrono::minutes(2);
  odd.status = BookingStatus::held;
  odd.version = 9'007'199'254'740'993;
  cases.push_back(odd);
  for (auto status : {BookingStatus::confirmed, BookingStatus::cancelled, BookingStatus::expired}) {
    Booking b = sample_booking();
    b.status = status;
    b.reason = RejectReason::none;
    b.reason_message.clear();
    cases.push_back(b);
  }
  for (std::size_t i = 0; i < cases.size(); ++i) {
    CAPTURE(i);
    const auto text = detail::json_text(cases[i]);
    REQUIRE(text);
    CHECK(*text == boost::json::serialize(to_json(cases[i])));
    CHECK(text->capacity() == text->size());  // kept by the bus: no room beyond the text
    std::string appended = "prefix";
    detail::append_json(appended, cases[i]);
    CHECK(appended == "prefix" + *text);
  }
  ResourceState r;
  r.id = "hall \"A\"";
  r.capacity = 10;
  r.reserved = 3;
  r.confirmed = 2;
  CHECK(*detail::json_text(r) == boost::json::serialize(to_json(r)));
}

TEST_CASE("json_text_error accepts exactly one JSON value") {
  for (const char* ok : {"{}", "[]", "0", "-1.5e3", "\"s\"", "true", "null", " {\"a\":[1,{\"b\":null}]} \n",
                         R"({"a":"\u00e9\ud83d\ude00"})"})
    CHECK_MESSAGE(!detail::json_text_error(ok), ok);
  for (const char* bad : {"", " ", "{", "{\"a\":}", "{} {}", "{}x", "[1,]", "{'a':1}", "\"\\x\"", "01", "nul",
                          "\"\xff\"", "// c\n{}", "{\"a\":1,}"}) {
    const auto why = detail::json_text_error(bad);
    CHECK_MESSAGE(why.has_value(), bad);
    if (why) CHECK(!why->empty());
  }
}

TEST_CASE("payload_member reads a top-level member of a payload kept as text or as a value") {
  const auto t0 = std::chrono::system_clock::time_point{};
  auto check = [&](std::string json, std::string_view key, const boost::json::value& expected) {
    CAPTURE(json);
    CAPTURE(key);
    const Event as_text("t", 1, t0, std::make_shared<const std::string>(json));
    const Event as_value("t", 1, t0, std::make_shared<const boost::json::value>(boost::json::parse(json)));
    CHECK(detail::payload_member(as_text, key) == expected);
    CHECK(detail::payload_member(as_value, key) == expected);
  };
  const std::string long_status(40, 's');
  const std::string json = R"({"nested":{"status":"inner","version":7},"list":[{"status":"x"}],)"
                           R"("status":"confirmed","version":12,"big":18446744073709551615,"neg":-3,)"
                           R"("d":2.5,"yes":true,"none":null,"esc":"a\"b\u00e9","long":")" +
                           long_status + R"(","obj":{},"arr":[1]})";
  check(json, "status", "confirmed");
  check(json, "version", 12);
  check(json, "big", 18446744073709551615ull);
  check(json, "neg", -3);
  check(json, "d", 2.5);
  check(json, "yes", true);
  check(json, "none", nullptr);
  check(json, "esc", "a\"b\u00e9");
  check(json, "long", boost::json::string_view(long_status));
  check(json, "obj", nullptr);
  check(json, "arr", nullptr);
  check(json, "missing", nullptr);
  check(R"(["status","confirmed"])", "status", nullptr);
  check(R"("status")", "status", nullptr);
  check(R"({"a":{"b":{"status":1}},"status":2})", "status", 2);
  // Escaped keys, escapes and non-ASCII in values, every kind of number, whitespace everywhere,
  // a key given twice: the text answers as the parsed value does.
  check(R"({"st\u0061tus":"escaped key","x":1})", "status", "escaped key");
  check(R"({"status":"é"})", "status", "é");
  check(R"({"status":"tab\there"})", "status", "tab\there");
  check(R"({"v":-0})", "v", boost::json::parse("-0"));
  check(R"({"v":0})", "v", 0);
  check(R"({"v":1e2})", "v", 100.0);
  check(R"({"v":1.0})", "v", 1.0);
  check(R"({"v":9223372036854775807})", "v", 9223372036854775807ll);
  check(R"({"v":9223372036854775808})", "v", 9223372036854775808ull);
  check(R"({"v":18446744073709551616})", "v", 18446744073709551616.0);
  check(R"({"v":-9223372036854775808})", "v", std::numeric_limits<std::int64_t>::min());
  check(R"({"v":-9223372036854775809})", "v", -9223372036854775809.0);
  check(" \t\r\n{ \"a\" : [ \"]\" , { \"}\" : 1 } ] , \"v\" :\ttrue , \"w\":false }\n ", "v", true);
  check(R"({"v":1,"v":{"x":1}})", "v", nullptr);
  check(R"({"v":{"x":1},"v":"last"})", "v", "last");
  check(R"({"a":"\\\"","v":null})", "v", nullptr);
  check(R"({})", "v", nullptr);
  // Text no bus would keep (an Event a host made of it): read without harm, a scalar or null.
  for (const char* bad : {"", "{", R"({"v")", R"({"v":)", R"({"v":"open)", R"({"v":[1,)", R"({"v":1,})",
                          R"({"v":tru})", R"({"v":01})", R"({"a":"\)", "{\"v\":1} x", "}"}) {
    CAPTURE(bad);
    const Event e("t", 1, t0, std::make_shared<const std::string>(bad));
    const auto v = detail::payload_member(e, "v");
    CHECK((v.is_null() || v.is_number() || v.is_string() || v.is_bool()));
  }
  // The text is read once per call, the event's data() is not made: a text event keeps no value.
  const Event e("t", 1, t0, std::make_shared<const std::string>(R"({"status":"processing"})"));
  CHECK(detail::payload_member(e, "status") == "processing");
  CHECK(e.data_text());
}
