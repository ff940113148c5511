// pushbook/beast.hpp: for hosts that run their own Boost.Beast HTTP server and want the gateway
// to serve some of its connections. Including this header brings in Beast.
#pragma once

#include <pushbook/export.hpp>
#include <pushbook/push_gateway.hpp>

#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>

namespace pushbook {

/// Hands a request the host has read (and its connection) to the gateway, which answers it as
/// if it had read it itself: a WebSocket upgrade to /v1/ws, an SSE stream, a REST route. The
/// gateway owns the connection from then on (keep-alive requests that follow included) and
/// moves it onto its own threads (or the io_context it was given). Bytes the host read beyond
/// the request must not exist: hand over right after reading one request.
PUSHBOOK_EXPORT void serve_request(PushGateway& gateway, boost::beast::tcp_stream stream,
                                   boost::beast::http::request<boost::beast::http::string_body> request);

}  // namespace pushbook
