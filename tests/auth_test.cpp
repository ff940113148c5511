#include <pushbook/auth.hpp>

#include "gateway/core.hpp"
#include "jwt_keys.hpp"

#include <doctest/doctest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cstdint>
#include <string>

using namespace pushbook;
using namespace std::chrono_literals;

namespace {
const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000));

using test::b64url;

// An HS256 token with exactly these claims (pushbook's sign_token only makes well-formed ones).
std::string token_with(const std::string& claims_json, const std::string& secret) {
  const auto signing = b64url(R"({"alg":"HS256","typ":"JWT"})") + "." + b64url(claims_json);
  unsigned char mac[32];
  unsigned int size = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(signing.data()), signing.size(), mac, &size);
  return signing + "." + b64url(std::string_view(reinterpret_cast<const char*>(mac), size));
}
}  // namespace

TEST_CASE("far-future and extreme time claims: no overflow, never expired at once, clamped") {
  using std::chrono::system_clock;
  for (const char* exp :
       {"9999999999", "11019504728", "9223372036854775807", "18446744073709551615", "1e300"}) {
    CAPTURE(exp);
    auto c = verify_token(token_with(std::string(R"({"sub":"alice","exp":)") + exp + "}", "k"), "k", now);
    REQUIRE(c.has_value());
    CHECK(c->expires_at > now + std::chrono::hours(24 * 365 * 100));
    CHECK(c->expires_at.time_since_epoch().count() > 0);  // not wrapped into the past
  }
  CHECK(verify_token(token_with(R"({"sub":"alice","exp":-9223372036854775808})", "k"), "k", now, 5s)
            .error()
            .message == "token expired");
  CHECK(verify_token(token_with(R"({"sub":"alice","exp":4102444800,"nbf":-9223372036854775808})", "k"), "k",
                     now, 5s)
            .has_value());
  CHECK(verify_token(token_with(R"({"sub":"alice","exp":4102444800,"nbf":9223372036854775807})", "k"), "k",
                     now, 5s)
            .error()
            .message == "token not valid yet");
  CHECK(verify_token(token_with(R"({"sub":"alice","exp":-1e300})", "k"), "k", now).error().message ==
        "token expired");
  auto unverified = read_token_unverified(token_with(R"({"sub":"alice","exp":9223372036854775807})", "k"));
  REQUIRE(unverified.has_value());
  CHECK(unverified->expires_at > now);
}

TEST_CASE("a token signed with the secret verifies and yields its claims") {
  const auto t = sign_token("alice", now + 1h, "k");
  auto c = verify_token(t, "k", now);
  REQUIRE(c.has_value());
  CHECK(c->subject == "alice");
  CHECK(c->expires_at == now + 1h);
}

TEST_CASE("a known HS256 token from outside pushbook verifies") {
  // {"alg":"HS256","typ":"JWT"}.{"sub":"1234567890","exp":4102444800} signed with "secret" by
  // Python's hmac module, not by pushbook.
  const char* token =
      "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwiZXhwIjo0MTAyNDQ0ODAwfQ."
      "B87ky_xnfSw6IuujR-udaBU_p6EHZ2WcNiTbiFXAmHg";  // computed with Python hmac
  auto c = verify_token(token, "secret", now);
  REQUIRE(c.has_value());
  CHECK(c->subject == "1234567890");
}

TEST_CASE("bad tokens are refused with a reason and never echoed") {
  const auto good = sign_token("alice", now + 1h, "k");
  struct Case {
    std::string token;
    const char* message;
  };
  for (const auto& c : {
           Case{"", "missing token"},
           Case{"abc", "malformed token: a JWT has three dot-separated parts"},
           Case{"a.b.c.d", "malformed token: a JWT has three dot-separated parts"},
           Case{sign_token("alice", now - 1h, "k"), "token expired"},
           Case{sign_token("alice", now + 1h, "other"), "bad token signature"},
           Case{good.substr(0, good.size() - 2) + "AA", "bad token signature"},
           Case{"eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.",
                "unsupported token algorithm: only HS256 is accepted"},
           Case{sign_token("bad user", now + 1h, "k"), "token has no valid \"sub\" claim"},
       }) {
    CAPTURE(c.token);
    auto r = verify_token(c.token, "k", now);
    REQUIRE_FALSE(r.has_value());
    CHECK(r.error().is(errc::unauthorized));
    CHECK(r.error().message == c.message);
  }
}

TEST_CASE("leeway tolerates small clock skew") {
  const auto t = sign_token("alice", now - 3s, "k");
  CHECK(verify_token(t, "k", now, 5s).has_value());
  CHECK_FALSE(verify_token(t, "k", now, 0s).has_value());
}

TEST_CASE("the default topic rule") {
  CHECK(default_topic_rule("alice", "resource/room-1", std::nullopt));
  CHECK(default_topic_rule("alice", "user/alice", std::nullopt));
  CHECK_FALSE(default_topic_rule("alice", "user/bob", std::nullopt));
  CHECK(default_topic_rule("alice", "booking/B1", std::string("alice")));
  CHECK_FALSE(default_topic_rule("alice", "booking/B1", std::string("bob")));
  CHECK_FALSE(default_topic_rule("alice", "booking/B1", std::nullopt));
  CHECK_FALSE(default_topic_rule("alice", "admin/x", std::nullopt));
}

TEST_CASE("access tokens are redacted from logged targets") {
  CHECK(detail::redact_target("/v1/events?topic=user/a&access_token=SECRET.TOKEN.X") ==
        "/v1/events?topic=user/a&access_token=REDACTED");
  CHECK(detail::redact_target("/v1/ws?access_token=abc&user=x") == "/v1/ws?access_token=REDACTED&user=x");
  CHECK(detail::redact_target("/v1/ws?my_access_token=abc") == "/v1/ws?my_access_token=abc");
}

TEST_CASE("read_token_unverified reads sub (and exp) without checking the signature") {
  auto c = read_token_unverified(sign_token("dev", now + 1h, "any-secret"));
  REQUIRE(c.has_value());
  CHECK(c->subject == "dev");
  CHECK(c->expires_at == now + 1h);
  CHECK(read_token_unverified("nodots").error().message ==
        "malformed token: a JWT has three dot-separated parts");
  CHECK(read_token_unverified("a.!!.c").error().message == "malformed token payload");
}
