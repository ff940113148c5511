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
  /// Connects and completes the handshake. Errors: unauthorized / forbidden / overloaded (the
  /// HTTP status the server refused the upgrade with), internal (connection failed, timeout).
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

/// A keep-alive HTTP/1.1 client for one server; reconnects when the server closed.
class PUSHBOOK_EXPORT HttpClient {
 public:
  HttpClient(std::string host, std::uint16_t port, std::chrono::milliseconds timeout = 5s);
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
