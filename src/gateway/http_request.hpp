// What the gateway reads out of an HTTP request before it acts on it: who sends it, its query
// parameters, the resume point of an event stream, the long-poll wait. Functions of the request
// only, with no I/O, so that the session (http_session.cpp) and the fuzzer
// (fuzz/fuzz_http_request.cpp) run the same code on the same parsed request.
#pragma once

#include "gateway/protocol.hpp"

#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/url/url_view.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace pushbook::detail {

namespace beast = boost::beast;
namespace http = beast::http;
using Request = http::request<http::string_body>;

/// The longest request head (request line and fields) the parser accepts.
inline constexpr std::size_t header_limit = 16 * 1024;
/// The most unparsed bytes one connection may hold. The parser consumes body bytes as they come
/// (bounded by max_body_bytes), so only a single syntactic element waits here: a request head
/// (header_limit), a chunk-size line with its extensions, or a trailer field. Beyond this the read
/// fails with http::error::buffer_overflow and the client gets 431 (head) or 413 (body).
inline constexpr std::size_t read_buffer_limit = 2 * header_limit;

/// Who a request comes from.
struct Identity {
  std::string user;
  std::optional<std::chrono::system_clock::time_point> expires;
};

/// Authenticates a request: Authorization: Bearer, the access_token query parameter, or (for
/// WebSocket upgrades) a "bearer.<token>" entry of Sec-WebSocket-Protocol; in dev_insecure mode
/// also ?user= and X-Pushbook-User.
/// `url` is the request's target, parsed.
result<Identity> authenticate(const GatewayContext& ctx, const Request& req, const boost::urls::url_view& url,
                              bool allow_subprotocol);

/// The (percent-decoded) value of the first query parameter named `key`.
std::optional<std::string> query_param(const boost::urls::url_view& url, std::string_view key);

/// The resume point of GET /v1/events: the Last-Event-ID header ("EPOCH:SEQ" as sent in "id:",
/// or a bare SEQ), else ?since=SEQ with an optional ?epoch=EPOCH. Errors: bad_request.
result<ResumePoint> resume_point(const Request& req, const boost::urls::url_view& url);

/// How long GET /v1/bookings/<id> may wait for a change: ?wait=SECONDS (a non-negative decimal
/// number, capped at `max`; each one given must be one, the last one counts), zero without one.
/// Errors: bad_request.
result<std::chrono::seconds> long_poll_wait(const boost::urls::url_view& url, std::chrono::seconds max);

}  // namespace pushbook::detail
