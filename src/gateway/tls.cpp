#include "gateway/tls.hpp"

#include "gateway/http_session.hpp"
#include "gateway/stream.hpp"

#include <fmt/format.h>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/detect_ssl.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <fstream>
#include <optional>

namespace pushbook::detail {

namespace ssl = boost::asio::ssl;

namespace {

// TLS 1.2's suites: forward secrecy and AEAD only (TLS 1.3 has only such suites, OpenSSL's
// defaults are kept for it).
constexpr const char* tls12_ciphers =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

// ALPN: the gateway speaks HTTP/1.1 (and WebSocket over it). A client offering only other
// protocols (h2 alone) gets no ALPN answer and may go on with HTTP/1.1 or give up.
int select_alpn(SSL*, const unsigned char** out, unsigned char* out_len, const unsigned char* in,
                unsigned int in_len, void*) {
  static const unsigned char http11[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
  unsigned char* selected = nullptr;
  if (SSL_select_next_proto(&selected, out_len, http11, sizeof http11, in, in_len) != OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  *out = selected;
  return SSL_TLSEXT_ERR_OK;
}

// OpenSSL's reason for the last failure (its error queue), or `fallback`.
std::string openssl_reason(const boost::system::error_code& ec) {
  std::string out;
  while (const unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? ec.message() : out;
}

Error file_error(std::string_view what, const std::string& path) {
  return Error(errc::bad_request, fmt::format("TLS {} file '{}' cannot be read", what, path));
}

result<std::shared_ptr<ssl::context>> make_context(const TlsOptions& o) {
  if (o.cert_file.empty() || o.key_file.empty())
    return Error(errc::bad_request, "TLS needs both a certificate file and a key file");
  for (const auto& [what, path] :
       {std::pair<std::string_view, const std::string&>{"certificate", o.cert_file},
        {"key", o.key_file},
        {"client CA", o.client_ca_file}})
    if (!path.empty() && !std::ifstream(path).good()) return file_error(what, path);
  ERR_clear_error();
  auto ctx = std::make_shared<ssl::context>(ssl::context::tls_server);
  SSL_CTX* native = ctx->native_handle();
  SSL_CTX_set_min_proto_version(native, TLS1_2_VERSION);
  SSL_CTX_set_options(native,
                      SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (SSL_CTX_set_cipher_list(native, tls12_ciphers) != 1)
    return Error(errc::internal, "OpenSSL refused the TLS 1.2 cipher list: " + openssl_reason({}));
  SSL_CTX_set_alpn_select_cb(native, select_alpn, nullptr);
  boost::system::error_code ec;
  ctx->use_certificate_chain_file(o.cert_file, ec);
  if (ec)
    return Error(errc::bad_request,
                 fmt::format("TLS certificate file '{}': {}", o.cert_file, openssl_reason(ec)));
  ctx->use_private_key_file(o.key_file, ssl::context::pem, ec);
  // OpenSSL compares the key with the certificate as it loads it ("key values mismatch").
  const auto reason = ec ? openssl_reason(ec) : std::string();
  if ((ec && reason.find("mismatch") != std::string::npos) || (!ec && SSL_CTX_check_private_key(native) != 1))
    return Error(errc::bad_request,
                 fmt::format("TLS key '{}' does not match the certificate '{}'", o.key_file, o.cert_file));
  if (ec) return Error(errc::bad_request, fmt::format("TLS key file '{}': {}", o.key_file, reason));
  if (!o.client_ca_file.empty()) {
    ctx->load_verify_file(o.client_ca_file, ec);
    STACK_OF(X509_NAME)* names = ec ? nullptr : SSL_load_client_CA_file(o.client_ca_file.c_str());
    if (ec || !names)
      return Error(errc::bad_request,
                   fmt::format("TLS client CA file '{}': {}", o.client_ca_file, openssl_reason(ec)));
    SSL_CTX_set_client_CA_list(native, names);  // the CAs a client is told to choose from
    ctx->set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
    // Session resumption with client certificates needs a context id.
    static const unsigned char id[] = "pushbook";
    SSL_CTX_set_session_id_context(native, id, sizeof id - 1);
  }
  return ctx;
}

// The first bytes of a connection on a TLS port: a ClientHello starts the handshake; anything
// else is plain HTTP (a shared port) or refused (TLS only). Registered as a session so that
// stop() can cut a handshake in progress.
class TlsPortSession : public Session, public std::enable_shared_from_this<TlsPortSession> {
 public:
  TlsPortSession(std::shared_ptr<GatewayCore> core, tcp::socket socket, bool refuse)
      : core_(std::move(core)), stream_(std::move(socket)), buffer_(4096), refuse_(refuse) {}

  ~TlsPortSession() override {
    if (!handed_over_) core_->open_connections.fetch_sub(1);
    core_->registry.remove(this);
  }

  void run() {
    core_->registry.add(shared_from_this());
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->detect(); });
  }

  void shutdown() override { abort(); }  // nothing served yet: nothing to finish

  void abort() override {
    net::post(executor_, [self = shared_from_this()] { self->close(); });
  }

 private:
  void detect() {
    // The detection and the handshake together get handshake_timeout (a stalled ClientHello
    // or handshake is cut then); the HTTP request gets its own after.
    stream_.expires_after(core_->ctx->options.handshake_timeout);
    beast::async_detect_ssl(
        stream_, buffer_,
        [self = shared_from_this()](boost::system::error_code ec, bool tls) { self->on_detect(ec, tls); });
  }

  void on_detect(boost::system::error_code ec, bool tls) {
    if (closed_) return;
    if (ec) {
      core_->log(LogLevel::debug,
                 fmt::format("TLS port: nothing read before the connection ended: {}", ec.message()));
      return close();
    }
    if (!tls) {
      if (core_->tls->tls_only()) return refuse_plain();
      // A shared port: plain HTTP, with the bytes the detection read.
      handed_over_ = true;
      const std::string_view first(static_cast<const char*>(buffer_.data().data()), buffer_.size());
      std::make_shared<HttpSession<PlainStream>>(core_, std::move(stream_), refuse_, first)->run();
      core_->registry.remove(this);  // after the HTTP session registered: stop() sees one of them
      return;
    }
    context_ = core_->tls->current();
    tls_.emplace(std::move(stream_), *context_);
    // Beast 1.81 checks this overload's handler against void(error_code) although it completes
    // with (error_code, bytes used): the default argument satisfies both.
    tls_->async_handshake(ssl::stream_base::server, buffer_.data(),
                          [self = shared_from_this()](boost::system::error_code e, std::size_t used = 0) {
                            self->on_handshake(e, used);
                          });
  }

  void on_handshake(boost::system::error_code ec, std::size_t used) {
    if (closed_) return;
    if (ec) {
      core_->metrics.tls_handshake_failures.fetch_add(1, std::memory_order_relaxed);
      core_->log(LogLevel::debug, fmt::format("TLS handshake failed: {}", openssl_reason(ec)));
      return close();
    }
    core_->metrics.tls_handshakes.fetch_add(1, std::memory_order_relaxed);
    if (used < buffer_.size()) {
      // Bytes after the ClientHello that the handshake did not take: not something a client
      // sends before the server's answer.
      core_->metrics.tls_handshake_failures.fetch_add(1, std::memory_order_relaxed);
      return close();
    }
    handed_over_ = true;
    std::make_shared<HttpSession<TlsStream>>(core_, std::move(*tls_), refuse_)->run();
    core_->registry.remove(this);  // after the HTTP session registered: stop() sees one of them
  }

  // Plain input on a TLS-only port: an HTTP client (a method's capital letters) is told in
  // plain text; anything else is closed without a word.
  void refuse_plain() {
    core_->metrics.tls_plain_refused.fetch_add(1, std::memory_order_relaxed);
    const auto* first = static_cast<const unsigned char*>(buffer_.data().data());
    if (buffer_.size() == 0 || first[0] < 'A' || first[0] > 'Z') return close();
    static const std::string answer = [] {
      const std::string body = "This port speaks TLS only: use https:// or wss://\n";
      return fmt::format(
          "HTTP/1.1 400 Bad Request\r\nServer: pushbook\r\nContent-Type: text/plain; charset=utf-8\r\n"
          "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
          body.size(), body);
    }();
    net::async_write(stream_, net::buffer(answer),
                     [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
                       if (ec) return self->close();
                       boost::system::error_code ignored;
                       self->stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
                       // Closing with request bytes unread would send a reset, which may make the
                       // client drop the answer: read what it still sends, for a second at most.
                       self->stream_.expires_after(std::chrono::seconds(1));
                       self->linger();
                     });
  }

  void linger() {
    buffer_.clear();
    stream_.async_read_some(buffer_.prepare(4096),
                            [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
                              if (ec) return self->close();
                              self->linger();
                            });
  }

  void close() {
    if (closed_ || handed_over_) return;
    closed_ = true;
    if (tls_)
      close_now(*tls_);
    else
      close_now(stream_);
  }

  std::shared_ptr<GatewayCore> core_;
  PlainStream stream_;
  net::any_io_executor executor_ = stream_.get_executor();  // the connection's strand, kept after a move
  beast::flat_buffer buffer_;
  bool refuse_;
  std::shared_ptr<ssl::context> context_;
  std::optional<TlsStream> tls_;
  bool handed_over_ = false;
  bool closed_ = false;
};

}  // namespace

result<std::shared_ptr<TlsContext>> TlsContext::create(const TlsOptions& options) {
  auto ctx = make_context(options);
  if (!ctx) return ctx.error();
  std::shared_ptr<TlsContext> out(new TlsContext(options));
  out->current_ = std::move(*ctx);
  return out;
}

result<void> TlsContext::reload() {
  auto ctx = make_context(options_);
  if (!ctx) return ctx.error();
  std::lock_guard lock(mutex_);
  current_ = std::move(*ctx);
  return {};
}

std::shared_ptr<ssl::context> TlsContext::current() const {
  std::lock_guard lock(mutex_);
  return current_;
}

void serve_tls_port(const std::shared_ptr<GatewayCore>& core, tcp::socket socket, bool refuse) {
  std::make_shared<TlsPortSession>(core, std::move(socket), refuse)->run();
}

}  // namespace pushbook::detail
