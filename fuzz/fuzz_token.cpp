// Token verification on any token a client can send (Authorization: Bearer, ?access_token=,
// Sec-WebSocket-Protocol, the "refresh" op). Each input is tried four ways:
//   1. as a token: verify_token with a secret and with a key set (HS256, RS256, ES256 keys by
//      kid), and read_token_unverified (development mode); and as a JWKS document when it is JSON;
//   2. as "HEADER\nPAYLOAD" JSON, encoded and signed here with the right secret, so that inputs get
//      past the signature and into the header and claims checks (alg, sub, exp, nbf);
//   3. as a subject for sign_token, whose token must verify exactly when the subject is valid.
#include "fuzz_check.hpp"

#include <pushbook/auth.hpp>
#include <pushbook/booking.hpp>

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include <chrono>
#include <string>

using namespace pushbook;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view secret = "fuzz-secret";
// A fixed "now" keeps runs reproducible: 2023-11-14T22:13:20Z.
const auto now = std::chrono::system_clock::time_point(std::chrono::seconds(1'700'000'000));

std::string base64url(std::string_view in) {
  static constexpr char chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::string out;
  unsigned acc = 0;
  int bits = 0;
  for (unsigned char c : in) {
    acc = (acc << 8) | c;
    bits += 8;
    while (bits >= 6) {
      bits -= 6;
      out += chars[(acc >> bits) & 63];
    }
  }
  if (bits > 0) out += chars[(acc << (6 - bits)) & 63];
  return out;
}

std::string sign(std::string_view header_json, std::string_view payload_json) {
  const std::string input = base64url(header_json) + "." + base64url(payload_json);
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(input.data()), input.size(), mac, &len);
  return input + "." + base64url(std::string_view(reinterpret_cast<const char*>(mac), len));
}

// The public half of a key made here, as PEM.
std::string public_pem(EVP_PKEY* key) {
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PUBKEY(bio, key);
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<std::size_t>(len));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

// A key set as a deployment has one during a rotation with an identity provider: the default
// HS256 key (tokens without kid), a second HS256 key, an RS256 and an ES256 public key.
const KeySet& key_set() {
  static const KeySet keys = [] {
    auto set = KeySet::from_secret(secret);
    if (!set.add_hs256("k2", "fuzz-secret-of-the-second-key-0123456789")) std::abort();
    if (!set.add_public_key_pem("rsa",
                                public_pem(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", std::size_t{2048}))))
      std::abort();
    if (!set.add_public_key_pem("ec", public_pem(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256"))))
      std::abort();
    return set;
  }();
  return keys;
}

// What every verification must give: a valid subject, or errc::unauthorized whose message does
// not repeat the token (messages are logged and sent back).
void check(const result<TokenClaims>& claims, std::string_view token) {
  if (claims) {
    FUZZ_CHECK(is_valid_id(claims->subject));
    return;
  }
  FUZZ_CHECK(claims.error().is(errc::unauthorized));
  FUZZ_CHECK(!claims.error().message.empty());
  // A token has dots, which no message of verify_token has: one found in a message came from
  // the token (a shorter piece, or a dotless input, can occur in a fixed message by chance).
  if (token.size() >= 16 && token.find('.') != std::string_view::npos)
    FUZZ_CHECK(claims.error().message.find(token) == std::string::npos);
}

void verify_both(std::string_view token) {
  const auto verified = verify_token(token, secret, now, 5s);
  check(verified, token);
  const auto unverified = read_token_unverified(token);
  check(unverified, token);
  if (verified) {
    // Whatever passes the signature check reads the same without it.
    FUZZ_CHECK(unverified.has_value());
    FUZZ_CHECK(unverified->subject == verified->subject);
    FUZZ_CHECK(unverified->expires_at == verified->expires_at);
    FUZZ_CHECK(verified->expires_at > now - 5s);
  }
  // Another secret never verifies it.
  FUZZ_CHECK(!verify_token(token, "another-secret", now, 5s));
  // Through the key set (kid chooses the key, alg must be the key's).
  const auto by_set = verify_token(token, key_set(), now, 5s);
  check(by_set, token);
  if (by_set) {
    FUZZ_CHECK(unverified.has_value());
    FUZZ_CHECK(unverified->subject == by_set->subject);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto text = pushbook::fuzz::as_text(data, size);

  verify_both(text);

  // The input as a JWKS document (an operator's file, or an identity provider's answer): keys or
  // a clear error, nothing else.
  if (!text.empty() && text.front() == '{') {
    auto jwks = KeySet::from_jwks(text);
    if (!jwks) FUZZ_CHECK(!jwks.error().message.empty());
  }

  const auto newline = text.find('\n');
  if (newline != std::string_view::npos)
    verify_both(sign(text.substr(0, newline), text.substr(newline + 1)));
  else
    verify_both(sign(R"({"alg":"HS256","typ":"JWT"})", text));

  if (size <= 256) {
    const auto expires = now + 1h;
    const auto token = sign_token(text, expires, secret);
    const auto claims = verify_token(token, secret, now, 5s);
    FUZZ_CHECK(claims.has_value() == is_valid_id(text));
    if (claims) {
      FUZZ_CHECK(claims->subject == text);
      FUZZ_CHECK(claims->expires_at == expires);
    }
  }
  return 0;
}
