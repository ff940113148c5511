// pushbook/auth.hpp: JWT tokens as the gateway verifies them (one HS256 secret, or a KeySet of
// HS256 secrets and RS256/ES256 public keys chosen by the token's "kid"), and the default rule of
// who may see which topic.
#pragma once

#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pushbook {

/// What a verified token says.
struct TokenClaims {
  /// The user id (`sub`).
  std::string subject;
  /// When the token stops being valid (`exp`).
  std::chrono::system_clock::time_point expires_at;
};

/// Verifies an HS256 JWT: the header must name alg HS256 (anything else, "none" included, is
/// refused), the signature is an HMAC-SHA256 of `secret` compared in constant time, `sub` must be
/// a valid id (is_valid_id) and `exp` must lie ahead (give or take `leeway`); `nbf`, when present,
/// must have passed. The header's "kid", if any, is not looked at (see KeySet for keys by kid).
/// Errors: errc::unauthorized, with a message that never contains the token.
PUSHBOOK_EXPORT result<TokenClaims> verify_token(
    std::string_view token, std::string_view secret,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now(),
    std::chrono::seconds leeway = std::chrono::seconds(5));

/// The signature algorithms a KeySet verifies. Each key has exactly one, and a token's "alg"
/// must name it: a token cannot pick how its key is used (no algorithm confusion).
enum class TokenAlgorithm {
  /// HMAC-SHA256 with a shared secret.
  hs256,
  /// RSASSA-PKCS1-v1_5 with SHA-256, RSA public keys of 2048 bits or more.
  rs256,
  /// ECDSA on P-256 with SHA-256 (the JWS signature is r||s, 64 bytes).
  es256,
};
/// "HS256", "RS256" or "ES256".
PUSHBOOK_EXPORT const char* to_string(TokenAlgorithm a) noexcept;

/// What KeySet::keys() tells about a key; never the key itself.
struct KeyInfo {
  /// The key id tokens name in their header's "kid"; empty: the key for tokens without "kid".
  std::string kid;
  TokenAlgorithm algorithm = TokenAlgorithm::hs256;
  /// The key's size: the secret's bits for HS256, the modulus' for RS256, 256 for ES256.
  std::size_t bits = 0;
  /// An HS256 key that may sign (KeySet::signing_kid()); false once retired, and for public keys.
  bool signs = false;
};

class KeySet;

/// Verifies a JWT with the key its header's "kid" names in `keys` (the default key, whose kid is
/// empty, when it names none). Refused: an unknown kid, an "alg" other than the key's ("none"
/// always), a bad signature (an ES256 one of any length but 64 bytes too), and what
/// verify_token(token, secret) refuses about the claims. Errors: errc::unauthorized, with a
/// message that never contains the token (an unknown kid is named, shortened and sanitised).
PUSHBOOK_EXPORT result<TokenClaims> verify_token(
    std::string_view token, const KeySet& keys,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now(),
    std::chrono::seconds leeway = std::chrono::seconds(5));

/// An HS256 JWT signed with the signing key of `keys` (KeySet::signing_kid(), named in the
/// header's "kid" unless empty). Errors: errc::bad_request when the set has no key that signs.
PUSHBOOK_EXPORT result<std::string> sign_token(std::string_view subject,
                                               std::chrono::system_clock::time_point expires_at,
                                               const KeySet& keys);

/// The keys tokens are verified with, by key id: HS256 secrets, RSA public keys (RS256) and EC
/// P-256 public keys (ES256), from code, PEM or a JWKS document (RFC 7517; docs/protocol.md,
/// "Keys").
///
/// A token's header "kid" picks its key; a token without "kid" (or with an empty one) uses the
/// key whose kid is empty, the default key, which a set may have once. The token's "alg" must be
/// the key's algorithm. Of the HS256 keys not retired, the one added last signs (sign_token),
/// so a rotation is: add the new key, retire the old one, and remove it once every token signed
/// with it has expired.
///
/// A value type: copies are independent sets sharing the immutable key material. Verifying
/// through a const KeySet is thread-safe; the gateway holds a `std::shared_ptr<const KeySet>`
/// and swaps in a new one to reload (PushGateway::set_keys). All errors are errc::bad_request,
/// with a message naming the key (its kid, shortened and stripped of control characters) and
/// never its material.
class PUSHBOOK_EXPORT KeySet {
 public:
  KeySet();
  ~KeySet();
  KeySet(const KeySet& other);
  KeySet& operator=(const KeySet& other);
  KeySet(KeySet&& other) noexcept;
  KeySet& operator=(KeySet&& other) noexcept;

  /// A set of one HS256 key without kid, for tokens without kid: what GatewayOptions::secret
  /// means. An empty secret gives an empty set.
  static KeySet from_secret(std::string_view secret);
  /// The keys of a JWKS document ({"keys":[...]}, see add_jwks). Refused when no key is left.
  static result<KeySet> from_jwks(std::string_view json);
  /// from_jwks() of a file's content (at most 1 MiB). Errors name the file.
  static result<KeySet> load_file(const std::string& path);

  /// Adds an HS256 secret (not empty) under `kid`, signing unless `may_sign` is false.
  result<void> add_hs256(std::string_view kid, std::string_view secret, bool may_sign = true);
  /// Adds a public key in PEM ("-----BEGIN PUBLIC KEY-----", SubjectPublicKeyInfo): RSA of 2048
  /// bits or more verifies RS256, EC on P-256 verifies ES256; anything else, and private keys,
  /// are refused.
  result<void> add_public_key_pem(std::string_view kid, std::string_view pem);
  /// add_public_key_pem() of a file's content.
  result<void> add_public_key_file(std::string_view kid, const std::string& path);
  /// Adds every key of a JWKS document: "kty":"oct" ("k": the HS256 secret, base64url), "RSA"
  /// ("n", "e") or "EC" ("crv":"P-256", "x", "y"), each with an optional "kid" and "alg" (which
  /// must then be HS256, RS256 or ES256 to match). Keys with a "use" other than "sig", or with
  /// "key_ops" lacking "verify", are skipped; an oct key whose "key_ops" lacks "sign" is added
  /// retired. All or nothing: on any bad key (a missing or malformed member, another curve or
  /// key type, private key members, a kid twice) nothing is added.
  result<void> add_jwks(std::string_view json);

  /// Stops the key `kid` from signing; it still verifies. Errors: no such key.
  result<void> retire(std::string_view kid);
  /// Removes the key `kid`: tokens naming it are refused from then on. False when absent.
  bool remove(std::string_view kid);

  bool contains(std::string_view kid) const noexcept;
  std::size_t size() const noexcept;
  bool empty() const noexcept { return size() == 0; }
  /// Every key, in the order added.
  std::vector<KeyInfo> keys() const;
  /// The kid of the key sign_token(subject, expires_at, KeySet) signs with: the HS256 key not
  /// retired that was added last. nullopt when there is none.
  std::optional<std::string> signing_kid() const;

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
  friend result<TokenClaims> verify_token(std::string_view token, const KeySet& keys,
                                          std::chrono::system_clock::time_point now,
                                          std::chrono::seconds leeway);
  friend result<std::string> sign_token(std::string_view subject,
                                        std::chrono::system_clock::time_point expires_at, const KeySet& keys);
};

/// Reads a JWT's "sub" (and "exp" when present; otherwise time_point::max()) WITHOUT checking
/// its signature or expiry. For development mode only (GatewayOptions::dev_insecure).
/// Errors: errc::unauthorized.
PUSHBOOK_EXPORT result<TokenClaims> read_token_unverified(std::string_view token);

/// Makes an HS256 JWT for `subject` valid until `expires_at` (for tests, tools and a host's
/// demo login; production tokens usually come from an identity provider).
PUSHBOOK_EXPORT std::string sign_token(std::string_view subject,
                                       std::chrono::system_clock::time_point expires_at,
                                       std::string_view secret);
/// The same with `kid` in the token's header (none when empty), for a secret that is one of the
/// HS256 keys of a KeySet.
PUSHBOOK_EXPORT std::string sign_token(std::string_view subject,
                                       std::chrono::system_clock::time_point expires_at,
                                       std::string_view secret, std::string_view kid);
/// The default authorisation rule for subscribing to a topic: "resource/<id>" is public;
/// "user/<id>" only for that user; "booking/<id>" only for the booking's user, given as
/// `booking_owner` (nullopt when the booking does not exist). Anything else is refused.
PUSHBOOK_EXPORT bool default_topic_rule(std::string_view user, std::string_view topic,
                                        const std::optional<std::string>& booking_owner);

}  // namespace pushbook
