// TLS for the gateway: the OpenSSL context built from GatewayOptions::tls (reloadable), and the
// first step of every connection on a TLS port: tell TLS from plain by the first bytes, then the
// TLS handshake, then the HTTP session over the right stream. OpenSSL stays in tls.cpp and the
// session files.
#pragma once

#include "gateway/core.hpp"

#include <memory>
#include <mutex>

namespace boost::asio::ssl {
class context;
}

namespace pushbook::detail {

/// The SSL context new handshakes use; reload() swaps it, connections keep the one they began
/// with (OpenSSL counts the references of a context).
class TlsContext {
 public:
  /// Reads the files of `options`. Errors: bad_request (unreadable file, bad PEM, key and
  /// certificate that do not match), with the file and the reason.
  static result<std::shared_ptr<TlsContext>> create(const TlsOptions& options);
  /// Reads the files again; the current context stays on error.
  result<void> reload();
  std::shared_ptr<boost::asio::ssl::context> current() const;
  bool tls_only() const noexcept { return options_.tls_only; }

 private:
  explicit TlsContext(TlsOptions options) : options_(std::move(options)) {}
  TlsOptions options_;
  mutable std::mutex mutex_;
  std::shared_ptr<boost::asio::ssl::context> current_;
};

/// Serves an accepted connection on a port with TLS: detection (GatewayOptions::tls.tls_only
/// decides what plain input gets), the handshake within handshake_timeout, then HTTP.
void serve_tls_port(const std::shared_ptr<GatewayCore>& core, tcp::socket socket, bool refuse);

}  // namespace pushbook::detail
