// pushbook/client.hpp: a small C++ client for the gateway's protocol v1 (docs/protocol.md), used
// by the tests, the examples and tools. Blocking calls with timeouts; each client reads on a
// thread of its own.
#pragma once

#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pushbook::client {

using namespace std::chrono_literals;

/// TLS for a client connection (https://, wss://).
struct TlsClientOptions {
  bool enabled = false;
  /// PEM file of the CA certificates to trust; empty: the system's (OpenSSL's default paths).
  std::string ca_file;
  /// Development only: accept any certificate (a self-signed test server) and any name. Never
  /// against a server that real users' tokens go to.
  bool insecure = false;
  /// The name the certificate must carry, sent as SNI too (an IP address is checked against the
  /// certificate's IP addresses and not sent); empty: the host connected to.
  std::string server_name;
  /// PEM client certificate (chain) and key, for servers that ask for one (mutual TLS).
  std::string cert_file;
  std::string key_file;
};

/// Where a URL points: "ws://", "wss://", "http://" or "https://", a host (a name, an IPv4
/// address or a bracketed IPv6 one), an optional port (default 80 / 443), an optional path
/// with query (default "/").
struct Url {
  bool tls = false;
  bool websocket = false;
  std::string host;
  std::uint16_t port = 0;
  std::string target = "/";
  /// Errors: bad_request naming what is wrong with `url`.
  static result<Url> parse(std::string_view url);
};

struct ConnectOptions {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  /// Sent as "Authorization: Bearer <token>" (or as a subprotocol, as browsers must).
  std::string token;
  bool token_as_subprotocol = false;
  std::string target = "/v1/ws";
  /// Sent as the Origin header when not empty.
  std::string origin;
  std::chrono::milliseconds timeout = 5s;
  /// TLS (wss://); off by default.
  TlsClientOptions tls;
  /// host, port, target and tls.enabled from a "ws://" or "wss://" URL (an "http(s)://" one is
  /// taken as the same server). Errors: bad_request.
  static result<ConnectOptions> from_url(std::string_view url);
};

/// How the server closed a WebSocket.
struct CloseInfo {
  std::uint16_t code = 0;
  std::string reason;
};

/// A WebSocket client speaking protocol v1. Replies are matched to requests by id; events,
/// gap markers and notices queue up in arrival order for next(). Thread-safe.
class PUSHBOOK_EXPORT WsClient {
 public:
  /// Connects (with TLS when options.tls.enabled) and completes the handshake. Errors:
  /// unauthorized / forbidden / overloaded (the HTTP status the server refused the upgrade
  /// with), internal (connection failed, timeout, TLS handshake or certificate check failed:
  /// the message says which).
  static result<std::unique_ptr<WsClient>> connect(ConnectOptions options);
  ~WsClient();
  WsClient(const WsClient&) = delete;
  WsClient& operator=(const WsClient&) = delete;

  /// Sends `request` with a fresh "id" and waits for the reply object ({"type":"reply","ok":...}).
  /// Errors: internal (timeout, connection closed).
  result<boost::json::object> request(boost::json::object request, std::chrono::milliseconds timeout = 5s);
  /// Sends a text frame as it is (for malformed-input tests).
  result<void> send_text(std::string_view text);
  /// Sends a binary frame.
  result<void> send_binary(std::string_view data);
  /// The next event, gap marker or notice, waiting up to `timeout`.
  std::optional<boost::json::object> next(std::chrono::milliseconds timeout = 5s);
  /// Replies that arrived without a matching request (e.g. to a malformed frame), oldest first.
  std::optional<boost::json::object> next_unmatched_reply(std::chrono::milliseconds timeout = 5s);
  /// Waits until the connection is closed; the server's close code and reason if it sent one.
  std::optional<CloseInfo> wait_closed(std::chrono::milliseconds timeout = 5s);
  /// Closes with `code` and waits (briefly) for the server's answer.
  void close(std::uint16_t code = 1000, std::string_view reason = {});
  bool is_open() const;
  /// WebSocket frames received so far (a frame may carry several messages).
  std::uint64_t frames_received() const;

  struct impl;

 private:
  explicit WsClient(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

struct HttpResponse {
  unsigned status = 0;
  /// Header names in lower case.
  std::map<std::string, std::string> headers;
  std::string body;
  /// The body parsed as JSON (null when it is not JSON).
  boost::json::value json() const;
  std::string header(const std::string& lower_case_name) const;
};

/// A keep-alive HTTP/1.1 client for one server (https with `tls.enabled`); reconnects when the
/// server closed.
class PUSHBOOK_EXPORT HttpClient {
 public:
  HttpClient(std::string host, std::uint16_t port, std::chrono::milliseconds timeout = 5s,
             TlsClientOptions tls = {});
  /// For the server of an "http://" or "https://" URL (its path is ignored); `tls.enabled` is
  /// set from the scheme. Errors: bad_request.
  static result<std::unique_ptr<HttpClient>> from_url(std::string_view url, TlsClientOptions tls = {},
                                                      std::chrono::milliseconds timeout = 5s);
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  /// Errors: internal (connection failed, timeout; the message says which).
  result<HttpResponse> request(std::string_view method, std::string_view target, std::string body = {},
                               const std::vector<std::pair<std::string, std::string>>& headers = {});

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace pushbook::client
