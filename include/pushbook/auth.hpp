// pushbook/auth.hpp: JWT (HS256) tokens, as the gateway verifies them, and the default rule of
// who may see which topic.
#pragma once

#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

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
/// must have passed. Errors: errc::unauthorized, with a message that never contains the token.
PUSHBOOK_EXPORT result<TokenClaims> verify_token(
    std::string_view token, std::string_view secret,
    std::chrono::system_clock::time_point now = std::chrono::system_clock::now(),
    std::chrono::seconds leeway = std::chrono::seconds(5));

/// Reads a JWT's "sub" (and "exp" when present; otherwise time_point::max()) WITHOUT checking
/// its signature or expiry. For development mode only (GatewayOptions::dev_insecure).
/// Errors: errc::unauthorized.
PUSHBOOK_EXPORT result<TokenClaims> read_token_unverified(std::string_view token);

/// Makes an HS256 JWT for `subject` valid until `expires_at` (for tests, tools and a host's
/// demo login; production tokens usually come from an identity provider).
PUSHBOOK_EXPORT std::string sign_token(std::string_view subject,
                                       std::chrono::system_clock::time_point expires_at,
                                       std::string_view secret);

/// The default authorisation rule for subscribing to a topic: "resource/<id>" is public;
/// "user/<id>" only for that user; "booking/<id>" only for the booking's user, given as
/// `booking_owner` (nullopt when the booking does not exist). Anything else is refused.
PUSHBOOK_EXPORT bool default_topic_rule(std::string_view user, std::string_view topic,
                                        const std::optional<std::string>& booking_owner);

}  // namespace pushbook
