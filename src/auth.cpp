#include <pushbook/auth.hpp>

#include <algorithm>
#include <pushbook/booking.hpp>

#include <fmt/format.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>

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

// A JWT split into its parts, its header parsed. Views into the token.
struct TokenParts {
  std::string_view signing_input;  // header "." payload: what the signature covers
  std::string_view payload_b64;
  std::string_view signature_b64;
  boost::json::object header;
};

result<TokenParts> split_token(std::string_view token) {
  if (token.empty()) return unauthorized("missing token");
  if (token.size() > 8192) return unauthorized("token too long");
  const auto dot1 = token.find('.');
  const auto dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos || token.find('.', dot2 + 1) != std::string_view::npos)
    return unauthorized("malformed token: a JWT has three dot-separated parts");
  TokenParts parts;
  parts.signing_input = token.substr(0, dot2);
  parts.payload_b64 = token.substr(dot1 + 1, dot2 - dot1 - 1);
  parts.signature_b64 = token.substr(dot2 + 1);
  auto header_json = base64url_decode(token.substr(0, dot1));
  if (!header_json) return unauthorized("malformed token header");
  boost::system::error_code ec;
  auto header = boost::json::parse(*header_json, ec);
  if (ec || !header.is_object()) return unauthorized("malformed token header");
  parts.header = std::move(header.as_object());
  return parts;
}

// The header's "alg", or empty when it has none (or not a string).
std::string_view alg_of(const boost::json::object& header) {
  auto alg = header.if_contains("alg");
  if (!alg || !alg->is_string()) return {};
  return alg->get_string();
}

// What the claims of a token whose signature held say, if they hold now.
result<TokenClaims> check_claims(std::string_view payload_b64, std::chrono::system_clock::time_point now,
                                 std::chrono::seconds leeway) {
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

bool hs256_signature_holds(std::string_view secret, const TokenParts& parts) {
  auto signature = base64url_decode(parts.signature_b64);
  if (!signature || signature->size() != 32) return false;
  const auto expected = hmac_sha256(secret, parts.signing_input);
  return CRYPTO_memcmp(expected.data(), signature->data(), expected.size()) == 0;
}

}  // namespace

result<TokenClaims> verify_token(std::string_view token, std::string_view secret,
                                 std::chrono::system_clock::time_point now, std::chrono::seconds leeway) {
  auto parts = split_token(token);
  if (!parts) return parts.error();
  if (alg_of(parts->header) != "HS256")
    return unauthorized("unsupported token algorithm: only HS256 is accepted");
  if (!hs256_signature_holds(secret, *parts)) return unauthorized("bad token signature");
  return check_claims(parts->payload_b64, now, leeway);
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
  return sign_token(subject, expires_at, secret, {});
}

std::string sign_token(std::string_view subject, std::chrono::system_clock::time_point expires_at,
                       std::string_view secret, std::string_view kid) {
  const auto exp = std::chrono::duration_cast<std::chrono::seconds>(expires_at.time_since_epoch()).count();
  boost::json::object payload{{"sub", subject}, {"exp", exp}};
  const std::string header =
      kid.empty()
          ? std::string(R"({"alg":"HS256","typ":"JWT"})")
          : boost::json::serialize(boost::json::object{{"alg", "HS256"}, {"typ", "JWT"}, {"kid", kid}});
  const std::string signing_input =
      base64url_encode(header) + "." + base64url_encode(boost::json::serialize(payload));
  const auto mac = hmac_sha256(secret, signing_input);
  return signing_input + "." +
         base64url_encode(std::string_view(reinterpret_cast<const char*>(mac.data()), mac.size()));
}

// --- KeySet ----------------------------------------------------------------------------------

const char* to_string(TokenAlgorithm a) noexcept {
  switch (a) {
    case TokenAlgorithm::hs256: return "HS256";
    case TokenAlgorithm::rs256: return "RS256";
    case TokenAlgorithm::es256: return "ES256";
  }
  return "?";
}

namespace {

// A key's material. Immutable once made, so copies of a KeySet share it (and so do threads).
struct KeyMaterial {
  TokenAlgorithm algorithm = TokenAlgorithm::hs256;
  std::size_t bits = 0;
  std::string secret;                    // HS256
  std::shared_ptr<EVP_PKEY> public_key;  // RS256, ES256

  KeyMaterial() = default;
  KeyMaterial(const KeyMaterial&) = delete;
  KeyMaterial& operator=(const KeyMaterial&) = delete;
  ~KeyMaterial() { OPENSSL_cleanse(secret.data(), secret.size()); }
};

Error bad_key(std::string why) { return Error(errc::bad_request, std::move(why)); }

// A kid as it may appear in a message: printable ASCII without quotes or backslashes, at most
// 64 characters. Kids come from tokens and files, and messages end up in logs and replies.
std::string printable(std::string_view kid) {
  std::string out;
  for (char c : kid.substr(0, 64)) out += (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') ? c : '?';
  if (kid.size() > 64) out += "...";
  return out;
}

// "key \"k1\"", or "the key without kid" for the default key: the subject of error messages.
std::string key_name(std::string_view kid) {
  return kid.empty() ? std::string("the key without kid") : fmt::format("key \"{}\"", printable(kid));
}

// OpenSSL keeps a per-thread queue of what went wrong; pushbook reports its own errors, so the
// queue is emptied after each failed call (it would otherwise grow on every bad token).
template <class T>
T clear_openssl_errors(T value) {
  ERR_clear_error();
  return value;
}

std::shared_ptr<EVP_PKEY> adopt(EVP_PKEY* key) { return std::shared_ptr<EVP_PKEY>(key, EVP_PKEY_free); }

// Checks that an RSA or EC public key is one pushbook verifies with, and says with what.
result<std::shared_ptr<const KeyMaterial>> public_key_material(std::string_view kid,
                                                               std::shared_ptr<EVP_PKEY> key) {
  auto material = std::make_shared<KeyMaterial>();
  const int bits = EVP_PKEY_get_bits(key.get());
  if (EVP_PKEY_is_a(key.get(), "RSA")) {
    if (bits < 2048)
      return bad_key(
          fmt::format("{}: an RSA key of {} bits is too weak (2048 at least)", key_name(kid), bits));
    material->algorithm = TokenAlgorithm::rs256;
  } else if (EVP_PKEY_is_a(key.get(), "EC")) {
    char group[64] = {};
    std::size_t length = 0;
    if (EVP_PKEY_get_utf8_string_param(key.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &length) !=
            1 ||
        std::string_view(group) != "prime256v1")
      return clear_openssl_errors(bad_key(fmt::format("{}: an EC key on curve {} (ES256 needs P-256)",
                                                      key_name(kid), group[0] ? group : "unknown")));
    material->algorithm = TokenAlgorithm::es256;
  } else {
    return bad_key(
        fmt::format("{}: unsupported key type (RS256 needs RSA, ES256 needs EC P-256)", key_name(kid)));
  }
  // The point on the curve, the modulus odd, and so on: a key that is not one is refused here
  // rather than failing every token later.
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> check(
      EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr), EVP_PKEY_CTX_free);
  if (!check || EVP_PKEY_public_check(check.get()) != 1)
    return clear_openssl_errors(bad_key(fmt::format("{}: not a valid public key", key_name(kid))));
  material->bits = static_cast<std::size_t>(bits);
  material->public_key = std::move(key);
  return std::shared_ptr<const KeyMaterial>(std::move(material));
}

struct BignumFree {
  void operator()(BIGNUM* b) const { BN_free(b); }
};
using BignumPtr = std::unique_ptr<BIGNUM, BignumFree>;

BignumPtr bignum(std::string_view big_endian) {
  return BignumPtr(BN_bin2bn(reinterpret_cast<const unsigned char*>(big_endian.data()),
                             static_cast<int>(big_endian.size()), nullptr));
}

// A public key from OpenSSL parameters (EVP_PKEY_fromdata), of type "RSA" or "EC".
std::shared_ptr<EVP_PKEY> key_from_params(const char* type,
                                          const std::function<bool(OSSL_PARAM_BLD*)>& push_params) {
  std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> builder(OSSL_PARAM_BLD_new(),
                                                                          OSSL_PARAM_BLD_free);
  if (!builder || !push_params(builder.get())) return nullptr;
  std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(builder.get()),
                                                                 OSSL_PARAM_free);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &key, EVP_PKEY_PUBLIC_KEY, params.get()) != 1)
    return nullptr;
  return adopt(key);
}

// A JWK's base64url member, decoded; an error naming the key and the member otherwise.
result<std::string> jwk_bytes(const boost::json::object& jwk, std::string_view member, std::string_view kid) {
  auto v = jwk.if_contains(member);
  if (!v) return bad_key(fmt::format("{}: no \"{}\"", key_name(kid), member));
  if (!v->is_string()) return bad_key(fmt::format("{}: \"{}\" is not a string", key_name(kid), member));
  auto bytes = base64url_decode(v->get_string());
  if (!bytes || bytes->empty())
    return bad_key(fmt::format("{}: \"{}\" is not base64url", key_name(kid), member));
  return std::move(*bytes);
}

// The JWS signature as OpenSSL verifies it: ES256's r||s (32 bytes each) as a DER ECDSA-Sig-Value.
std::optional<std::string> es256_der(std::string_view raw) {
  if (raw.size() != 64) return std::nullopt;
  std::unique_ptr<ECDSA_SIG, decltype(&ECDSA_SIG_free)> sig(ECDSA_SIG_new(), ECDSA_SIG_free);
  auto r = bignum(raw.substr(0, 32));
  auto s = bignum(raw.substr(32));
  if (!sig || !r || !s || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) return std::nullopt;
  r.release();  // owned by sig now
  s.release();
  unsigned char* der = nullptr;
  const int length = i2d_ECDSA_SIG(sig.get(), &der);
  if (length <= 0) return std::nullopt;
  std::string out(reinterpret_cast<const char*>(der), static_cast<std::size_t>(length));
  OPENSSL_free(der);
  return out;
}

bool public_signature_holds(const KeyMaterial& key, const TokenParts& parts) {
  auto signature = base64url_decode(parts.signature_b64);
  if (!signature) return false;
  if (key.algorithm == TokenAlgorithm::es256) {
    signature = es256_der(*signature);  // a signature of another length is refused here
    if (!signature) return false;
  }
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key.public_key.get()) != 1)
    return clear_openssl_errors(false);
  const bool holds =
      EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature->data()),
                       signature->size(), reinterpret_cast<const unsigned char*>(parts.signing_input.data()),
                       parts.signing_input.size()) == 1;
  return holds ? true : clear_openssl_errors(false);
}

result<std::string> read_file(const std::string& path) {
  constexpr std::size_t max_bytes = 1024 * 1024;
  std::ifstream file(path, std::ios::binary);
  if (!file) return bad_key(fmt::format("cannot read {}: {}", path, std::strerror(errno)));
  std::string content;
  content.resize(max_bytes + 1);
  file.read(content.data(), static_cast<std::streamsize>(content.size()));
  if (file.bad()) return bad_key(fmt::format("cannot read {}", path));
  content.resize(static_cast<std::size_t>(file.gcount()));
  if (content.size() > max_bytes) return bad_key(fmt::format("{}: larger than 1 MiB", path));
  return content;
}

}  // namespace

struct KeySet::impl {
  struct Entry {
    std::string kid;
    std::shared_ptr<const KeyMaterial> key;
    bool signs = false;
  };
  // In the order added (signing_kid() is the last HS256 key that signs). Sets are small: a
  // linear search costs less than the signature check that follows it.
  std::vector<Entry> entries;

  const Entry* find(std::string_view kid) const {
    for (const auto& e : entries)
      if (e.kid == kid) return &e;
    return nullptr;
  }
  const Entry* signer() const {
    for (auto it = entries.rbegin(); it != entries.rend(); ++it)
      if (it->signs) return &*it;
    return nullptr;
  }
  result<void> add(std::string_view kid, std::shared_ptr<const KeyMaterial> key, bool signs) {
    if (find(kid)) return bad_key(fmt::format("{} is in the set already", key_name(kid)));
    entries.push_back({std::string(kid), std::move(key), signs});
    return {};
  }
};

KeySet::KeySet() : impl_(std::make_unique<impl>()) {}
KeySet::~KeySet() = default;
KeySet::KeySet(const KeySet& other) : impl_(std::make_unique<impl>(*other.impl_)) {}
KeySet& KeySet::operator=(const KeySet& other) {
  if (this != &other) *impl_ = *other.impl_;
  return *this;
}
// A moved-from set is empty (and usable), not null.
KeySet::KeySet(KeySet&& other) noexcept : impl_(std::make_unique<impl>()) { std::swap(impl_, other.impl_); }
KeySet& KeySet::operator=(KeySet&& other) noexcept {
  if (this == &other) return *this;
  std::swap(impl_, other.impl_);
  other.impl_->entries.clear();
  return *this;
}

KeySet KeySet::from_secret(std::string_view secret) {
  KeySet keys;
  if (!secret.empty()) (void)keys.add_hs256({}, secret);
  return keys;
}

result<KeySet> KeySet::from_jwks(std::string_view json) {
  KeySet keys;
  if (auto added = keys.add_jwks(json); !added) return added.error();
  if (keys.empty()) return bad_key("the JWKS has no key to verify tokens with (every key was skipped)");
  return keys;
}

result<KeySet> KeySet::load_file(const std::string& path) {
  auto content = read_file(path);
  if (!content) return content.error();
  auto keys = from_jwks(*content);
  if (!keys) return bad_key(fmt::format("{}: {}", path, keys.error().message));
  return keys;
}

result<void> KeySet::add_hs256(std::string_view kid, std::string_view secret, bool may_sign) {
  if (secret.empty()) return bad_key(fmt::format("{}: an empty HS256 secret", key_name(kid)));
  auto material = std::make_shared<KeyMaterial>();
  material->algorithm = TokenAlgorithm::hs256;
  material->bits = secret.size() * 8;
  material->secret = std::string(secret);
  return impl_->add(kid, std::move(material), may_sign);
}

result<void> KeySet::add_public_key_pem(std::string_view kid, std::string_view pem) {
  if (impl_->find(kid)) return bad_key(fmt::format("{} is in the set already", key_name(kid)));
  if (pem.find("PRIVATE KEY-----") != std::string_view::npos)
    return bad_key(
        fmt::format("{}: a private key; give its public key (openssl pkey -pubout)", key_name(kid)));
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())),
                                                BIO_free);
  // No passphrase callback prompting on a terminal: public keys are never encrypted.
  auto no_passphrase = [](char*, int, int, void*) { return 0; };
  EVP_PKEY* key = bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, no_passphrase, nullptr) : nullptr;
  if (!key)
    return clear_openssl_errors(
        bad_key(fmt::format("{}: not a PEM public key (-----BEGIN PUBLIC KEY-----)", key_name(kid))));
  auto material = public_key_material(kid, adopt(key));
  if (!material) return material.error();
  return impl_->add(kid, std::move(*material), false);
}

result<void> KeySet::add_public_key_file(std::string_view kid, const std::string& path) {
  auto content = read_file(path);
  if (!content) return content.error();
  auto added = add_public_key_pem(kid, *content);
  if (!added) return bad_key(fmt::format("{}: {}", path, added.error().message));
  return {};
}

result<void> KeySet::add_jwks(std::string_view json) {
  boost::system::error_code ec;
  auto doc = boost::json::parse(json, ec);
  if (ec) return bad_key(fmt::format("not a JWKS: {}", ec.message()));
  const auto* keys = doc.is_object() ? doc.as_object().if_contains("keys") : nullptr;
  if (!keys || !keys->is_array()) return bad_key(R"(not a JWKS: no {"keys":[...]})");
  impl staged = *impl_;  // all or nothing
  std::size_t index = 0;
  for (const auto& value : keys->as_array()) {
    ++index;
    if (!value.is_object()) return bad_key(fmt::format("key #{}: not a JSON object", index));
    const auto& jwk = value.as_object();
    std::string kid;
    if (auto k = jwk.if_contains("kid")) {
      if (!k->is_string()) return bad_key(fmt::format("key #{}: \"kid\" is not a string", index));
      kid = std::string(k->get_string());
    }
    // What the key is for: signatures, verifying them (else it is skipped), signing (oct keys).
    if (auto use = jwk.if_contains("use"); use && !(use->is_string() && use->get_string() == "sig")) continue;
    bool may_sign = true;
    if (auto ops = jwk.if_contains("key_ops")) {
      if (!ops->is_array()) return bad_key(fmt::format("{}: \"key_ops\" is not an array", key_name(kid)));
      bool verifies = false;
      may_sign = false;
      for (const auto& op : ops->as_array()) {
        verifies = verifies || (op.is_string() && op.get_string() == "verify");
        may_sign = may_sign || (op.is_string() && op.get_string() == "sign");
      }
      if (!verifies) continue;
    }
    auto kty = jwk.if_contains("kty");
    if (!kty || !kty->is_string()) return bad_key(fmt::format("{}: no \"kty\"", key_name(kid)));
    const std::string_view type = kty->get_string();
    TokenAlgorithm algorithm;
    if (type == "oct")
      algorithm = TokenAlgorithm::hs256;
    else if (type == "RSA")
      algorithm = TokenAlgorithm::rs256;
    else if (type == "EC")
      algorithm = TokenAlgorithm::es256;
    else
      return bad_key(fmt::format("{}: unsupported key type \"{}\" (oct, RSA and EC are)", key_name(kid),
                                 printable(type)));
    if (auto alg = jwk.if_contains("alg");
        alg && !(alg->is_string() && alg->get_string() == to_string(algorithm)))
      return bad_key(fmt::format("{}: unsupported algorithm \"{}\" ({} keys verify {})", key_name(kid),
                                 alg->is_string() ? printable(alg->get_string()) : "?", printable(type),
                                 to_string(algorithm)));
    if (algorithm != TokenAlgorithm::hs256 && (jwk.contains("d") || jwk.contains("p")))
      return bad_key(
          fmt::format("{}: a private key; a key set holds public keys (and HS256 secrets)", key_name(kid)));
    if (algorithm == TokenAlgorithm::hs256) {
      auto secret = jwk_bytes(jwk, "k", kid);
      if (!secret) return secret.error();
      auto material = std::make_shared<KeyMaterial>();
      material->bits = secret->size() * 8;
      material->secret = std::move(*secret);
      if (auto added = staged.add(kid, std::move(material), may_sign); !added) return added.error();
      continue;
    }
    std::shared_ptr<EVP_PKEY> key;
    if (algorithm == TokenAlgorithm::rs256) {
      auto n = jwk_bytes(jwk, "n", kid);
      if (!n) return n.error();
      auto e = jwk_bytes(jwk, "e", kid);
      if (!e) return e.error();
      auto n_bn = bignum(*n);
      auto e_bn = bignum(*e);
      key = key_from_params("RSA", [&](OSSL_PARAM_BLD* b) {
        return n_bn && e_bn && OSSL_PARAM_BLD_push_BN(b, OSSL_PKEY_PARAM_RSA_N, n_bn.get()) == 1 &&
               OSSL_PARAM_BLD_push_BN(b, OSSL_PKEY_PARAM_RSA_E, e_bn.get()) == 1;
      });
    } else {
      auto crv = jwk.if_contains("crv");
      if (!crv || !crv->is_string()) return bad_key(fmt::format("{}: no \"crv\"", key_name(kid)));
      if (crv->get_string() != "P-256")
        return bad_key(fmt::format("{}: curve \"{}\" is not supported (ES256 needs P-256)", key_name(kid),
                                   printable(crv->get_string())));
      auto x = jwk_bytes(jwk, "x", kid);
      if (!x) return x.error();
      auto y = jwk_bytes(jwk, "y", kid);
      if (!y) return y.error();
      if (x->size() != 32 || y->size() != 32)
        return bad_key(fmt::format("{}: \"x\" and \"y\" of a P-256 key are 32 bytes each", key_name(kid)));
      const std::string point = "\x04" + *x + *y;  // uncompressed
      key = key_from_params("EC", [&](OSSL_PARAM_BLD* b) {
        return OSSL_PARAM_BLD_push_utf8_string(b, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) == 1 &&
               OSSL_PARAM_BLD_push_octet_string(b, OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()) == 1;
      });
    }
    if (!key)
      return clear_openssl_errors(bad_key(fmt::format("{}: not a valid {} key", key_name(kid), type)));
    auto material = public_key_material(kid, std::move(key));
    if (!material) return material.error();
    if (auto added = staged.add(kid, std::move(*material), false); !added) return added.error();
  }
  *impl_ = std::move(staged);
  return {};
}

result<void> KeySet::retire(std::string_view kid) {
  for (auto& e : impl_->entries)
    if (e.kid == kid) {
      e.signs = false;
      return {};
    }
  return bad_key(fmt::format("{} is not in the set", key_name(kid)));
}

bool KeySet::remove(std::string_view kid) {
  return std::erase_if(impl_->entries, [&](const impl::Entry& e) { return e.kid == kid; }) > 0;
}

bool KeySet::contains(std::string_view kid) const noexcept { return impl_->find(kid) != nullptr; }
std::size_t KeySet::size() const noexcept { return impl_->entries.size(); }

std::vector<KeyInfo> KeySet::keys() const {
  std::vector<KeyInfo> out;
  for (const auto& e : impl_->entries) out.push_back({e.kid, e.key->algorithm, e.key->bits, e.signs});
  return out;
}

std::optional<std::string> KeySet::signing_kid() const {
  if (auto s = impl_->signer()) return s->kid;
  return std::nullopt;
}

result<TokenClaims> verify_token(std::string_view token, const KeySet& keys,
                                 std::chrono::system_clock::time_point now, std::chrono::seconds leeway) {
  auto parts = split_token(token);
  if (!parts) return parts.error();
  const auto alg = alg_of(parts->header);
  TokenAlgorithm algorithm;
  if (alg == "HS256")
    algorithm = TokenAlgorithm::hs256;
  else if (alg == "RS256")
    algorithm = TokenAlgorithm::rs256;
  else if (alg == "ES256")
    algorithm = TokenAlgorithm::es256;
  else
    return unauthorized("unsupported token algorithm: HS256, RS256 and ES256 are accepted");
  std::string_view kid;
  if (auto k = parts->header.if_contains("kid")) {
    if (!k->is_string()) return unauthorized("malformed token header: \"kid\" is not a string");
    kid = k->get_string();
  }
  const auto* entry = keys.impl_->find(kid);
  if (!entry)
    return unauthorized(kid.empty() ? std::string("token names no key (\"kid\") and there is no default key")
                                    : fmt::format("unknown key id \"{}\"", printable(kid)));
  // The key decides the algorithm, never the token: an RS256 key's public PEM must not become an
  // HMAC secret because a token says "HS256".
  if (algorithm != entry->key->algorithm)
    return unauthorized(fmt::format("token algorithm {} does not match {} ({})", alg, key_name(kid),
                                    to_string(entry->key->algorithm)));
  const bool holds = algorithm == TokenAlgorithm::hs256 ? hs256_signature_holds(entry->key->secret, *parts)
                                                        : public_signature_holds(*entry->key, *parts);
  if (!holds) return unauthorized("bad token signature");
  return check_claims(parts->payload_b64, now, leeway);
}

result<std::string> sign_token(std::string_view subject, std::chrono::system_clock::time_point expires_at,
                               const KeySet& keys) {
  const auto* signer = keys.impl_->signer();
  if (!signer) return bad_key("the key set has no HS256 key that signs");
  return sign_token(subject, expires_at, signer->key->secret, signer->kid);
}

bool default_topic_rule(std::string_view user, std::string_view topic,
                        const std::optional<std::string>& booking_owner) {
  if (topic.starts_with("resource/")) return true;
  if (topic.starts_with("user/")) return topic.substr(5) == user;
  if (topic.starts_with("booking/")) return booking_owner && *booking_owner == user;
  return false;
}

}  // namespace pushbook
