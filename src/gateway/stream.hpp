// The two transports a gateway session runs on: a plain TCP stream and TLS over it. The sessions
// (HTTP, WebSocket, SSE) are templates over them; what differs is here.
#pragma once

#include "gateway/core.hpp"

#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <type_traits>

namespace pushbook::detail {

namespace beast = boost::beast;

using PlainStream = beast::tcp_stream;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;

template <class Stream>
inline constexpr bool is_tls_stream = std::is_same_v<Stream, TlsStream>;

/// The TCP socket under a stream of either kind.
template <class Stream>
tcp::socket& socket_of(Stream& stream) {
  return beast::get_lowest_layer(stream).socket();
}

/// Closes the connection now (no TLS close_notify): any thread's abort, a peer that went away,
/// or a stream with a read pending (TLS cannot shut down while one is).
template <class Stream>
void close_now(Stream& stream) {
  boost::system::error_code ec;
  socket_of(stream).shutdown(tcp::socket::shutdown_both, ec);
  socket_of(stream).close(ec);
}

/// Ends the connection politely after the last response was written (no read pending): plain
/// TCP sends FIN; TLS sends close_notify first (waiting at most a second for the peer's), so
/// that the client can tell the end from a cut. `keep` holds the stream's owner meanwhile.
template <class Stream, class Owner>
void close_after_response(Stream& stream, std::shared_ptr<Owner> keep) {
  if constexpr (is_tls_stream<Stream>) {
    beast::get_lowest_layer(stream).expires_after(std::chrono::seconds(1));
    stream.async_shutdown(
        [&stream, keep = std::move(keep)](boost::system::error_code) { close_now(stream); });
  } else {
    (void)keep;
    boost::system::error_code ec;
    socket_of(stream).shutdown(tcp::socket::shutdown_send, ec);
    socket_of(stream).close(ec);
  }
}

}  // namespace pushbook::detail
