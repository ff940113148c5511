#include <pushbook/auth.hpp>

#include <algorithm>
#include <pushbook/booking.hpp>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <array>

namespace pushbook {
namespace {

constexpr char b64url_chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

std::string base64url_encode(std::string_view in) {
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  std::size_t i = 0;
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(in[k]); };
  for (; i + 3 <= in.size(); i += 3) {
    const unsigned v = (byte(i) << 16) | (byte(i + 1) << 8) | byte(i + 2);
    out += b64url_chars[(v >> 18) & 63];
    out += b64url_chars[(v >> 12) & 63];
    out += b64url_chars[(v >> 6) & 63];
    out += b64url_chars[v & 63];
  }
  if (in.size() - i == 1) {
    const unsigned v = byte(i) << 16;
    out += b64url_chars[(v >> 18) & 63];
    out += b64url_chars[(v >> 12) & 63];
  } else if (in.size() - i == 2) {
    const unsigned v = (byte(i) << 16) | (byte(i + 1) << 8);
    out += b64url_chars[(v >> 18) & 63];
    out += b64url_chars[(v >> 12) & 63];
    out += b64url_chars[(v >> 6) & 63];
  }
  return out;  // unpadded, as JWT requires
}

std::optional<std::string> base64url_decode(std::string_view in) {
  if (in.size() % 4 == 1) return std::nullopt;
  std::string out;
  out.reserve(in.size() * 3 / 4);
  unsigned acc = 0;
  int bits = 0;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z')
      v = c - 'A';
    else if (c >= 'a' && c <= 'z')
      v = c - 'a' + 26;
    else if (c >= '0' && c <= '9')
      v = c - '0' + 52;
    else if (c == '-')
      v = 62;
    else if (c == '_')
      v = 63;
    else
      return std::nullopt;
    acc = (acc << 6) | static_cast<unsigned>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xFF);
    }
  }
  return out;
}

std::array<unsigned char, 32> hmac_sha256(std::string_view key, std::string_view data) {
  std::array<unsigned char, 32> mac{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac.data(), &len);
  return mac;
}

Error unauthorized(std::string why) { return Error(errc::unauthorized, std::move(why)); }

std::optional<std::int64_t> integer(const boost::json::object& o, std::string_view key) {
  auto v = o.if_contains(key);
  if (!v) return std::nullopt;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64())  // beyond int64: as far in the future as int64 goes (clamped later)
    return v->get_uint64() <= static_cast<std::uint64_t>(INT64_MAX)
               ? static_cast<std::int64_t>(v->get_uint64())
               : INT64_MAX;
  if (v->is_double()) {  // clamped: converting a double beyond int64 would be undefined
    const double d = v->get_double();
    if (!(d > -9.2e18)) return INT64_MIN;
    if (!(d < 9.2e18)) return INT64_MAX;
    return static_cast<std::int64_t>(d);
  }
  return std::nullopt;
}

// The payload part of a JWT as a JSON object.
result<boost::json::object> payload_of(std::string_view payload_b64) {
  auto json = base64url_decode(payload_b64);
  if (!json) return unauthorized("malformed token payload");
  boost::system::error_code ec;
  auto payload = boost::json::parse(*json, ec);
  if (ec || !payload.is_object()) return unauthorized("malformed token payload");
  return std::move(payload.as_object());
}

// A claim's time (Unix seconds) as a time_point: clamped to what system_clock can hold (about
// the years 1678 to 2262 with nanoseconds), so that no far-future "exp" overflows into the past.
std::chrono::system_clock::time_point claim_time(std::int64_t unix_seconds) {
  using clock = std::chrono::system_clock;
  constexpr auto max_s =
      std::chrono::duration_cast<std::chrono::seconds>(clock::time_point::max().time_since_epoch()).count() -
      1;
  constexpr auto min_s =
      std::chrono::duration_cast<std::chrono::seconds>(clock::time_point::min().time_since_epoch()).count() +
      1;
  return clock::time_point(std::chrono::seconds(std::clamp<std::int64_t>(unix_seconds, min_s, max_s)));
}

result<std::string> subject_of(const boost::json::object& claims) {
  auto sub = claims.if_contains("sub");
  if (!sub || !sub->is_string() || !is_valid_id(sub->get_string()))
    return unauthorized("token has no valid \"sub\" claim");
  return std::string(sub->get_string());
}

}  // namespace

result<TokenClaims> verify_token(std::string_view token, std::string_view secret,
                                 std::chrono::system_clock::time_point now, std::chrono::seconds leeway) {
  if (token.empty()) return unauthorized("missing token");
  if (token.size() > 8192) return unauthorized("token too long");
  const auto dot1 = token.find('.');
  const auto dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos || token.find('.', dot2 + 1) != std::string_view::npos)
    return unauthorized("malformed token: a JWT has three dot-separated parts");
  const auto header_b64 = token.substr(0, dot1);
  const auto payload_b64 = token.substr(dot1 + 1, dot2 - dot1 - 1);
  const auto signature_b64 = token.substr(dot2 + 1);

  auto header_json = base64url_decode(header_b64);
  if (!header_json) return unauthorized("malformed token header");
  boost::system::error_code ec;
  auto header = boost::json::parse(*header_json, ec);
  if (ec || !header.is_object()) return unauthorized("malformed token header");
  auto alg = header.as_object().if_contains("alg");
  if (!alg || !alg->is_string() || alg->get_string() != "HS256")
    return unauthorized("unsupported token algorithm: only HS256 is accepted");

  auto signature = base64url_decode(signature_b64);
  if (!signature || signature->size() != 32) return unauthorized("bad token signature");
  const auto expected = hmac_sha256(secret, token.substr(0, dot2));
  if (CRYPTO_memcmp(expected.data(), signature->data(), expected.size()) != 0)
    return unauthorized("bad token signature");

  auto payload = payload_of(payload_b64);
  if (!payload) return payload.error();
  const auto& claims = *payload;
  auto sub = subject_of(claims);
  if (!sub) return sub.error();
  auto exp = integer(claims, "exp");
  if (!exp) return unauthorized("token has no \"exp\" claim");
  const auto now_s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
  // Compared without adding to the claims, which may be anywhere in int64 (no overflow).
  if (*exp <= now_s - leeway.count()) return unauthorized("token expired");
  if (auto nbf = integer(claims, "nbf"); nbf && *nbf > now_s + leeway.count())
    return unauthorized("token not valid yet");
  TokenClaims out;
  out.subject = std::move(*sub);
  out.expires_at = claim_time(*exp);
  return out;
}

result<TokenClaims> read_token_unverified(std::string_view token) {
  const auto dot1 = token.find('.');
  const auto dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos)
    return unauthorized("malformed token: a JWT has three dot-separated parts");
  auto payload = payload_of(token.substr(dot1 + 1, dot2 - dot1 - 1));
  if (!payload) return payload.error();
  auto sub = subject_of(*payload);
  if (!sub) return sub.error();
  TokenClaims out;
  out.subject = std::move(*sub);
  out.expires_at = std::chrono::system_clock::time_point::max();
  if (auto exp = integer(*payload, "exp")) out.expires_at = claim_time(*exp);
  return out;
}

std::string sign_token(std::string_view subject, std::chrono::system_clock::time_point expires_at,
                       std::string_view secret) {
  const auto exp = std::chrono::duration_cast<std::chrono::seconds>(expires_at.time_since_epoch()).count();
  boost::json::object payload{{"sub", subject}, {"exp", exp}};
  const std::string signing_input = base64url_encode(R"({"alg":"HS256","typ":"JWT"})") + "." +
                                    base64url_encode(boost::json::serialize(payload));
  const auto mac = hmac_sha256(secret, signing_input);
  return signing_input + "." +
         base64url_encode(std::string_view(reinterpret_cast<const char*>(mac.data()), mac.size()));
}

bool default_topic_rule(std::string_view user, std::string_view topic,
                        const std::optional<std::string>& booking_owner) {
  if (topic.starts_with("resource/")) return true;
  if (topic.starts_with("user/")) return topic.substr(5) == user;
  if (topic.starts_with("booking/")) return booking_owner && *booking_owner == user;
  return false;
}

}  // namespace pushbook
