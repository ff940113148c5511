// pushbook/beast_ssl.hpp: pushbook/beast.hpp's hand-over for TLS connections, for hosts that
// terminate TLS in their own Boost.Beast server. Including this header brings in Beast's
// ssl_stream and OpenSSL's headers (the host links OpenSSL::SSL already).
#pragma once

#include <pushbook/beast.hpp>

#include <boost/beast/ssl/ssl_stream.hpp>

namespace pushbook {

/// As serve_request() of pushbook/beast.hpp, for a connection whose TLS handshake the host has
/// completed. TLS state cannot move to another executor: the gateway serves this connection on
/// the stream's own executor, which must therefore be a strand (or an io_context run by one
/// thread), and the host must keep running it. The host's ssl::context may go once the
/// handshake is done (OpenSSL keeps what the connection needs).
PUSHBOOK_EXPORT void serve_request(PushGateway& gateway,
                                   boost::beast::ssl_stream<boost::beast::tcp_stream> stream,
                                   boost::beast::http::request<boost::beast::http::string_body> request);

}  // namespace pushbook
