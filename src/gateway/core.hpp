// What the gateway's sessions share: the protocol context, metrics, the io_contexts connections
// are spread over, and the registry of live sessions (for graceful shutdown). Asio lives here
// and in the session files only.
#pragma once

#include <pushbook/push_gateway.hpp>

#include "gateway/metrics.hpp"
#include "gateway/protocol.hpp"
#include "gateway/rate_limit.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace pushbook::detail {

namespace net = boost::asio;
using tcp = net::ip::tcp;

/// A connection the gateway can shut down.
class Session {
 public:
  virtual ~Session() = default;
  /// Graceful: WebSockets close with 1001, SSE streams end, HTTP finishes its response. Any thread.
  virtual void shutdown() = 0;
  /// Cuts the connection now. Any thread.
  virtual void abort() = 0;
};

/// The live sessions, weakly held.
class SessionRegistry {
 public:
  /// Registers a session; once close_all() has run, the session is also told to shut down
  /// (a connection accepted while stop() runs is not left waiting for the shutdown timeout).
  void add(const std::shared_ptr<Session>& s);
  void remove(const Session* s);
  std::vector<std::shared_ptr<Session>> snapshot();
  /// From now on every session added is shut down at once; returns the sessions open now.
  std::vector<std::shared_ptr<Session>> close_all();
  /// Waits until no session is left or the deadline passes; true when empty.
  bool wait_empty(std::chrono::steady_clock::time_point deadline);
  std::size_t size();

 private:
  std::mutex mutex_;
  std::condition_variable empty_;
  bool closing_ = false;
  std::unordered_map<const Session*, std::weak_ptr<Session>> sessions_;
};

class Listener;
class TlsContext;

struct GatewayCore : std::enable_shared_from_this<GatewayCore> {
  std::shared_ptr<GatewayContext> ctx;
  GatewayMetrics metrics;
  SessionRegistry registry;
  std::vector<std::unique_ptr<net::io_context>> own_contexts;
  std::vector<net::executor_work_guard<net::io_context::executor_type>> guards;
  std::vector<std::thread> threads;
  net::io_context* host_context = nullptr;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> stopping{false};
  std::atomic<std::int64_t> open_connections{0};
  std::shared_ptr<Listener> listener;
  /// Set when GatewayOptions::tls is on: every accepted connection starts with serve_tls_port().
  std::shared_ptr<TlsContext> tls;
  std::atomic<std::uint16_t> port{0};

  /// New demo users (POST /v1/demo/token without a token) for the whole gateway: a token bucket
  /// of demo_users_per_second with a burst of demo_users_burst, so a script cannot mint users
  /// (and their state) without bound. Renewals of a good token are not counted.
  static constexpr double demo_users_per_second = 20;
  static constexpr double demo_users_burst = 100;
  bool take_demo_user(std::chrono::steady_clock::time_point now);
  std::mutex demo_mutex;
  TokenBucket demo_bucket{demo_users_burst, std::chrono::steady_clock::now()};

  /// GatewayOptions::user_rate_limit_per_second, for every request with a verified identity.
  std::unique_ptr<UserRateLimiter> user_limiter;

  /// Accept failures are logged at most once per period, with the count since the last report,
  /// not once each (at the file-descriptor limit they come by the thousand); the first accept
  /// that works again reports the failures not reported yet.
  void accept_failed(std::string_view why);
  void accept_succeeded();
  std::mutex accept_log_mutex;
  std::chrono::steady_clock::time_point accept_logged{};
  std::uint64_t accept_failures_unlogged = 0;
  std::atomic<bool> accept_failing{false};

  /// What /metrics serves (and PushGateway::metrics_text() returns): the gateway's, the engine's,
  /// the bus's and the topic hub's counters.
  std::string metrics_text() const;

  /// Writes an access log line ("access " + fields) when GatewayOptions::access_log is on.
  void access(std::string_view fields) const;

  /// The io_context for the next connection (round robin over the gateway's threads).
  net::io_context& next_context();
  /// The executor of the next connection: the next of the gateway's own io_contexts, each run by
  /// one thread (so a connection's handlers never run concurrently without a strand), or a strand
  /// of the host's io_context (which the host may run on several threads).
  net::any_io_executor connection_executor();
  void log(LogLevel level, std::string_view message) const;
  /// Starts serving an accepted TCP connection (TLS detection and handshake when TLS is on; HTTP
  /// first; upgrades and SSE from there).
  void serve(tcp::socket socket);
};

/// Turns Nagle's algorithm off on an accepted connection (every gateway socket).
void set_no_delay(tcp::socket& socket);

/// "ADDRESS:PORT".
std::string endpoint_text(const tcp::endpoint& peer);

/// "ADDRESS:PORT" of the socket's peer, or "-" when it has none (closed). Any TCP socket type
/// (the HTTP sessions' type-erased one, the own WebSocket layer's io_context-typed one).
template <typename Socket>
std::string peer_address(const Socket& socket) {
  boost::system::error_code ec;
  const auto peer = socket.remote_endpoint(ec);
  return ec ? std::string("-") : endpoint_text(peer);
}

/// Removes `access_token=...` values from a request target before it is logged.
std::string redact_target(std::string_view target);

}  // namespace pushbook::detail
