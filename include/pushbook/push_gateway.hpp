// pushbook/push_gateway.hpp: the HTTP + WebSocket + Server-Sent Events server that pushes booking
// events to the right, authenticated clients. Protocol: docs/protocol.md.
//
// Boost.Asio and Beast stay out of this header (pimpl); hosts with their own Beast server hand
// connections over with the functions of pushbook/beast.hpp.
#pragma once

#include <pushbook/auth.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/error.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace boost::asio {
class io_context;
}

namespace pushbook {

enum class LogLevel { debug, info, warning, error };
/// Receives the gateway's log lines. Tokens never appear in them.
using LogFunction = std::function<void(LogLevel, std::string_view)>;

/// Decides whether `user` may subscribe to `topic` (exact topic, already validated).
using TopicAuthorizer = std::function<bool(std::string_view user, std::string_view topic)>;

/// What happens to a client whose unsent data exceeds GatewayOptions::max_queued_bytes.
enum class SlowConsumerPolicy {
  /// Close the WebSocket with 1013 "try again later" (the client resumes with `since`).
  disconnect,
  /// Drop the oldest queued events and send a gap marker naming their topics.
  drop_with_gap,
};

/// TLS on the gateway's port: https, wss and SSE over TLS (TLS 1.2 and 1.3, ECDHE with AES-GCM
/// or ChaCha20-Poly1305, ALPN "http/1.1"). Off while cert_file is empty. OpenSSL does the work;
/// it stays out of this header.
struct TlsOptions {
  /// PEM: the server's certificate, then the intermediates of its chain.
  std::string cert_file;
  /// PEM: the certificate's private key (RSA or EC, not encrypted).
  std::string key_file;
  /// PEM CA certificates (optional): when set, every client must present a certificate one of
  /// them signed (mutual TLS); the handshake fails otherwise.
  std::string client_ca_file;
  /// false: plain and TLS connections share the port, told apart by their first bytes (a TLS
  /// ClientHello or not). true: only TLS; a plain HTTP request gets a plain-text 400 saying so,
  /// anything else is closed. Production wants true (tokens never travel in clear).
  bool tls_only = false;
};

struct GatewayOptions {
  /// Where listen() binds. Port 0 picks a free port (see PushGateway::port()).
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  /// Threads of the gateway's own (each runs an io_context; connections are spread over them).
  /// 0: one per core. Ignored when the host passes its io_context.
  std::size_t threads = 0;

  /// HS256 secret for client tokens (without "kid"): a key set of one key (KeySet::from_secret).
  /// Give `secret` or `keys`, not both; one of them unless dev_insecure.
  std::string secret;
  /// The keys client tokens are verified with, by their "kid": HS256 secrets, RS256 and ES256
  /// public keys (pushbook::KeySet, e.g. KeySet::load_file of a JWKS). Replaced while running
  /// with PushGateway::set_keys().
  std::shared_ptr<const KeySet> keys;
  /// Development only: accept clients without a verified token (identity from ?user=, the
  /// X-Pushbook-User header or an unverified token's "sub"). Logged loudly at start-up.
  bool dev_insecure = false;
  /// How far token expiry may be off (clock skew).
  std::chrono::seconds token_leeway = std::chrono::seconds(5);
  /// After a WebSocket's token expires the client gets this long to send {"op":"refresh"}.
  std::chrono::milliseconds token_refresh_grace = std::chrono::seconds(30);
  /// Allowed Origin values for WebSocket upgrades and SSE (exact match, e.g.
  /// "https://app.example.com"). Empty: any origin. Requests without Origin (not browsers) pass.
  std::vector<std::string> allowed_origins;
  /// Replaces the default rule (pushbook::default_topic_rule) for who may see which topic.
  TopicAuthorizer authorize;

  /// Largest WebSocket message a client may send (closed with 1009 beyond).
  std::size_t max_message_bytes = 64 * 1024;
  /// Largest HTTP request body (413 beyond).
  std::size_t max_body_bytes = 64 * 1024;
  /// Subscriptions one connection may hold.
  std::size_t max_subscriptions = 256;
  /// Client messages per second per connection (token bucket) and the burst allowed.
  double rate_limit_per_second = 100;
  std::size_t rate_limit_burst = 200;
  /// Authenticated HTTP requests per second per user, across all its connections (token bucket),
  /// and the burst allowed; beyond, 429 with Retry-After. Counts every request with a verified
  /// identity (bookings, long-polls, SSE and WebSocket upgrades, whoami). 0: no limit.
  double user_rate_limit_per_second = 20;
  std::size_t user_rate_limit_burst = 100;
  /// Time to send the HTTP request head, and to finish the WebSocket handshake (slow-loris).
  std::chrono::milliseconds handshake_timeout = std::chrono::seconds(10);
  /// A WebSocket with no traffic is pinged after half of this and closed after all of it; an
  /// idle keep-alive HTTP connection is closed after it.
  std::chrono::milliseconds idle_timeout = std::chrono::seconds(60);
  /// Unsent bytes per connection, at most; then SlowConsumerPolicy applies.
  std::size_t max_queued_bytes = 1024 * 1024;
  SlowConsumerPolicy slow_consumer = SlowConsumerPolicy::disconnect;
  /// Open connections per process; beyond, new ones get HTTP 503.
  std::size_t max_connections = 100'000;
  /// Longest ?wait= a long-poll may ask for.
  std::chrono::seconds max_long_poll = std::chrono::seconds(60);
  /// SSE comment lines keep idle streams open through proxies.
  std::chrono::milliseconds sse_keepalive = std::chrono::seconds(15);
  /// permessage-deflate (off unless asked: it costs CPU and memory per connection).
  bool permessage_deflate = false;
  /// How long stop() waits for connections to close before cutting them.
  std::chrono::milliseconds shutdown_timeout = std::chrono::seconds(5);
  /// Static files served under "/" (e.g. a demo page); empty: none.
  std::string static_dir;
  /// Demo mode (off at 0): `POST /v1/demo/token` hands anyone a token of this lifetime for a new
  /// user "demo-<random>", so a demo page can connect without a login. Needs `secret`, or `keys`
  /// with an HS256 key that signs (KeySet::signing_kid()). Never
  /// turn it on for a server real users book on.
  std::chrono::seconds demo_token_ttl{0};
  /// Access log (off by default): one info line per HTTP request and one per WebSocket or SSE
  /// session when it ends, to `log`, each starting with "access " followed by key=value fields:
  /// user, peer, method, route (the route's pattern, never the query: tokens can be there),
  /// status or close code, bytes, duration. Format: docs/protocol.md, "Access log".
  bool access_log = false;
  /// This gateway's name in a cluster (e.g. "node-2"; at most 64 letters, digits and `-_.:`).
  /// When set, every HTTP response, SSE stream and WebSocket handshake carries it as the
  /// `Pushbook-Node` header, and /healthz reports it, so that people (and tests) behind a load
  /// balancer can see which node answered. Empty (the default): no header.
  std::string node_name;
  /// TLS (off by default). The files are read at construction (an unreadable file, a bad PEM or
  /// a key that does not match the certificate throws bad_request) and again by reload_tls().
  TlsOptions tls;
  /// Log sink (default: one line per message on stderr).
  LogFunction log;
};

/// Counters of a gateway (the same as /metrics).
struct GatewayStats {
  std::int64_t websocket_connections = 0;
  std::int64_t sse_connections = 0;
  std::int64_t http_connections = 0;
  std::uint64_t connections_total = 0;
  std::int64_t subscriptions = 0;
  std::uint64_t messages_pushed = 0;
  std::uint64_t frames_written = 0;
  std::uint64_t bytes_pushed = 0;
  std::uint64_t slow_consumer_disconnects = 0;
  std::uint64_t dropped_messages = 0;
  /// Accepts that failed (typically at the file-descriptor limit) and the listener backed off.
  std::uint64_t accept_failures = 0;
  /// HTTP requests refused by the per-user rate limit.
  std::uint64_t user_rate_limited = 0;
};

/// The push gateway. Thread-safe.
class PUSHBOOK_EXPORT PushGateway {
 public:
  /// A gateway running on threads of its own (GatewayOptions::threads).
  /// Throws pushbook::Exception (bad_request) for invalid options, e.g. neither secret nor keys
  /// without dev_insecure, or both.
  PushGateway(EventBusPtr bus, std::shared_ptr<BookingEngine> engine, GatewayOptions options = {});
  /// A gateway running on the host's io_context: the host runs it on as many threads as it likes.
  PushGateway(EventBusPtr bus, std::shared_ptr<BookingEngine> engine, GatewayOptions options,
              boost::asio::io_context& io_context);
  /// Calls stop().
  ~PushGateway();
  PushGateway(const PushGateway&) = delete;
  PushGateway& operator=(const PushGateway&) = delete;

  /// Binds host:port and starts accepting. Returns the bound port. Errors: bad_request (bad
  /// address), internal (bind failed, e.g. port in use; the message says why).
  result<std::uint16_t> listen();
  /// The bound port (0 before listen()).
  std::uint16_t port() const noexcept;
  /// Serves a TCP connection the host accepted itself (its native socket handle; the gateway
  /// takes ownership).
  void accept_socket(int native_handle);
  /// Graceful shutdown, in order. 1. Drain (at most shutdown_timeout): new bookings are refused
  /// (`overloaded`, HTTP 503), /healthz answers 503 on new connections so a balancer stops
  /// sending, and the engine's bookings in flight are decided and pushed. 2. Close (at most
  /// another shutdown_timeout): stop accepting, close every WebSocket with 1001 "going away"
  /// once what is queued for it is written, and every SSE stream; let in-flight HTTP responses
  /// finish; cut what is left. 3. Join the gateway's threads. Idempotent. With a host io_context
  /// it must not be called from a thread running that io_context.
  void stop();

  /// Replaces the keys tokens are verified with (a reload: a rotated key file, an identity
  /// provider's new JWKS), atomically. Verifications from then on (handshakes, HTTP requests,
  /// {"op":"refresh"}) use `keys`; connections open already keep the identity they proved.
  /// Thread-safe. Errors: bad_request for a null or empty set, or, in demo mode, a set with no
  /// HS256 key that signs; the keys in use stay then.
  result<void> set_keys(std::shared_ptr<const KeySet> keys);
  /// The keys in use (null in dev_insecure mode without keys).
  std::shared_ptr<const KeySet> keys() const;

  /// Reads GatewayOptions::tls's files again (a renewed certificate) and uses them for the
  /// handshakes that start from then on; connections open already go on with the certificate
  /// they were given. Thread-safe. Errors: bad_request when TLS is off, when a file
  /// cannot be read or parsed, or when the key does not match the certificate (the message says
  /// which); the certificate in use then stays.
  result<void> reload_tls();
  /// Whether the gateway speaks TLS (GatewayOptions::tls.cert_file was given).
  bool tls_enabled() const noexcept;

  GatewayStats stats() const;
  /// The Prometheus text exposition served at /metrics.
  std::string metrics_text() const;

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
  friend struct impl;
  friend class GatewayAccess;
};

}  // namespace pushbook
