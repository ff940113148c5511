#include <pushbook/error.hpp>

#include <doctest/doctest.h>

using namespace pushbook;

TEST_CASE("errc has a category, stable names and converts to std::error_code") {
  std::error_code ec = errc::sold_out;
  CHECK(ec.category().name() == std::string("pushbook"));
  CHECK(ec.message() == "sold out");
  CHECK(std::string(to_string(errc::idempotency_conflict)) == "idempotency_conflict");
  CHECK(std::string(to_string(errc::overloaded)) == "overloaded");
  CHECK(std::string(to_string(errc::bus_unavailable)) == "bus_unavailable");
  CHECK(make_error_code(errc::bus_unavailable).message() == "event bus unavailable");
  CHECK(static_cast<int>(errc::bus_unavailable) == 20);  // appended: earlier values keep theirs
  CHECK(ec == make_error_code(errc::sold_out));
  CHECK(ec != make_error_code(errc::not_found));
}

TEST_CASE("result holds a value or an error") {
  result<int> ok = 42;
  REQUIRE(ok.has_value());
  CHECK(*ok == 42);

  result<int> bad = Error(errc::not_found, "no booking 'x'");
  CHECK_FALSE(bad.has_value());
  CHECK(bad.error().is(errc::not_found));
  CHECK(bad.error().message == "no booking 'x'");
  CHECK_THROWS_AS(bad.value(), Exception);
  try {
    (void)bad.value();
  } catch (const Exception& e) {
    CHECK(e.code() == make_error_code(errc::not_found));
    CHECK(std::string(e.what()).find("no booking 'x'") != std::string::npos);
  }

  result<void> v;
  CHECK(v.has_value());
  result<void> e = Error(errc::bad_request, "bad");
  CHECK_FALSE(e.has_value());
  CHECK_THROWS_AS(e.value(), Exception);
}
