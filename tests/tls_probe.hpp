// Test helpers for TLS: certificates made at run time by scripts/make-test-certs.sh (no key is
// committed), and a small TLS client that can do what pushbook's client never does on purpose:
// offer odd ALPN lists, send a wrong SNI, show the certificate it was given, read raw bytes.
#pragma once

#include "temp_dir.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#ifndef PUSHBOOK_SOURCE_DIR
#error "PUSHBOOK_SOURCE_DIR must name the source tree (scripts/make-test-certs.sh)"
#endif

namespace pushbook::test {

/// A test CA, server certificates for localhost/127.0.0.1 (server, server2), a client
/// certificate and a key matching nothing (other.key), in a temporary directory.
class TestCerts {
 public:
  explicit TestCerts(std::string_view kind = "ec") {
    const auto command =
        fmt::format("bash '{}/scripts/make-test-certs.sh' '{}' {}", PUSHBOOK_SOURCE_DIR, dir_.path(), kind);
    REQUIRE(std::system(command.c_str()) == 0);
  }
  std::string file(std::string_view name) const { return dir_.file(name); }
  std::string path() const { return dir_.path(); }

  /// Made once per test process (each test copies what it changes).
  static const TestCerts& shared() {
    static const TestCerts certs;
    return certs;
  }

 private:
  TempDir dir_{"pushbook-certs"};
};

struct ProbeOptions {
  std::string ca_file;  // empty: no verification
  std::string server_name;
  std::vector<std::string> alpn;  // protocols to offer; empty: no ALPN
  std::string cert_file, key_file;
  /// 0: OpenSSL's; else the highest version offered (e.g. TLS1_1_VERSION: an old client, which
  /// the probe then allows itself to be, security level 0).
  int max_version = 0;
  std::chrono::milliseconds timeout = std::chrono::seconds(5);
};

/// ProbeOptions with what most tests set (GCC warns about designated initializers that skip
/// members).
inline ProbeOptions probe(std::string ca_file = {}, std::string server_name = {},
                          std::vector<std::string> alpn = {}) {
  ProbeOptions o;
  o.ca_file = std::move(ca_file);
  o.server_name = std::move(server_name);
  o.alpn = std::move(alpn);
  return o;
}

/// One TLS connection to 127.0.0.1:port, every step bounded by `timeout`.
class TlsProbe {
 public:
  explicit TlsProbe(std::uint16_t port, ProbeOptions o = {}) : options_(std::move(o)) {
    namespace ssl = boost::asio::ssl;
    SSL_CTX_set_min_proto_version(context_.native_handle(),
                                  options_.max_version ? TLS1_VERSION : TLS1_2_VERSION);
    if (options_.max_version) {
      SSL_CTX_set_security_level(context_.native_handle(), 0);
      SSL_CTX_set_max_proto_version(context_.native_handle(), options_.max_version);
    }
    if (!options_.ca_file.empty()) {
      context_.load_verify_file(options_.ca_file);
      context_.set_verify_mode(ssl::verify_peer);
    }
    if (!options_.cert_file.empty()) {
      context_.use_certificate_chain_file(options_.cert_file);
      context_.use_private_key_file(options_.key_file, ssl::context::pem);
    }
    if (!options_.alpn.empty()) {
      std::string wire;
      for (const auto& p : options_.alpn) wire += static_cast<char>(p.size()) + p;
      SSL_CTX_set_alpn_protos(context_.native_handle(), reinterpret_cast<const unsigned char*>(wire.data()),
                              static_cast<unsigned>(wire.size()));
    }
    stream_.emplace(io_, context_);
    boost::system::error_code ec;
    stream_->next_layer().connect({boost::asio::ip::make_address("127.0.0.1"), port}, ec);
    if (ec) {
      error_ = ec;
      return;
    }
    if (!options_.server_name.empty())
      SSL_ctrl(stream_->native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
               const_cast<char*>(options_.server_name.c_str()));
    if (!options_.ca_file.empty())
      stream_->set_verify_callback(boost::asio::ssl::host_name_verification(
          options_.server_name.empty() ? "127.0.0.1" : options_.server_name));
    error_ = run([&](auto done) { stream_->async_handshake(boost::asio::ssl::stream_base::client, done); });
  }

  /// The handshake's outcome (or the connection's).
  boost::system::error_code error() const { return error_; }
  bool ok() const { return !error_; }

  /// The CN of the certificate the server presented.
  std::string peer_common_name() {
    X509* cert = SSL_get1_peer_certificate(stream_->native_handle());
    if (!cert) return {};
    char cn[256] = {};
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn);
    X509_free(cert);
    return cn;
  }
  /// The protocol ALPN selected ("" when none).
  std::string alpn() {
    const unsigned char* p = nullptr;
    unsigned len = 0;
    SSL_get0_alpn_selected(stream_->native_handle(), &p, &len);
    return std::string(reinterpret_cast<const char*>(p), len);
  }
  std::string version() { return SSL_get_version(stream_->native_handle()); }

  bool write(std::string_view data) {
    return !run([&](auto done) {
      boost::asio::async_write(*stream_, boost::asio::buffer(data.data(), data.size()),
                               [done](boost::system::error_code ec, std::size_t) { done(ec); });
    });
  }

  /// Reads until `needle` arrived, the connection ended or the timeout passed; all read so far.
  std::string read_until(std::string_view needle) {
    const auto deadline = std::chrono::steady_clock::now() + options_.timeout;
    while (received_.find(needle) == std::string::npos && !ended_ &&
           std::chrono::steady_clock::now() < deadline) {
      char buf[4096];
      std::size_t n = 0;
      auto ec = run([&](auto done) {
        stream_->async_read_some(boost::asio::buffer(buf),
                                 [done, &n](boost::system::error_code e, std::size_t got) {
                                   n = got;
                                   done(e);
                                 });
      });
      received_.append(buf, n);
      if (ec) ended_ = true;
    }
    return received_;
  }
  bool ended() const { return ended_; }

 private:
  // Runs one asynchronous operation to completion or until the timeout (then cancels it).
  template <class Start>
  boost::system::error_code run(Start start) {
    std::optional<boost::system::error_code> result;
    start([&result](boost::system::error_code ec) { result = ec; });
    io_.restart();
    io_.run_for(options_.timeout);
    if (!result) {
      boost::system::error_code ignored;
      stream_->next_layer().close(ignored);
      io_.restart();
      io_.run();
      return boost::asio::error::timed_out;
    }
    return *result;
  }

  ProbeOptions options_;
  boost::asio::io_context io_;
  boost::asio::ssl::context context_{boost::asio::ssl::context::tls_client};
  std::optional<boost::asio::ssl::stream<boost::asio::ip::tcp::socket>> stream_;
  boost::system::error_code error_;
  std::string received_;
  bool ended_ = false;
};

}  // namespace pushbook::test
