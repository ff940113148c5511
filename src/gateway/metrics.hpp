// Gateway counters and their Prometheus text form. No I/O here.
#pragma once

#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>

#include "gateway/topic_hub.hpp"

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace pushbook::detail {

struct GatewayMetrics {
  std::atomic<std::int64_t> websocket_connections{0};
  std::atomic<std::int64_t> sse_connections{0};
  std::atomic<std::int64_t> http_connections{0};
  std::atomic<std::uint64_t> connections_total{0};
  std::atomic<std::uint64_t> connections_refused{0};
  std::atomic<std::int64_t> subscriptions{0};
  std::atomic<std::uint64_t> messages_pushed{0};
  std::atomic<std::uint64_t> frames_written{0};
  std::atomic<std::uint64_t> bytes_pushed{0};
  std::atomic<std::int64_t> queued_bytes{0};
  std::atomic<std::uint64_t> slow_consumer_disconnects{0};
  std::atomic<std::uint64_t> dropped_messages{0};
  std::atomic<std::uint64_t> client_messages{0};
  std::atomic<std::uint64_t> client_errors{0};
  std::atomic<std::uint64_t> rate_limited{0};
  std::atomic<std::uint64_t> user_rate_limited{0};
  std::atomic<std::uint64_t> accept_failures{0};
  /// 1 while the listener backs off after a failed accept (e.g. out of file descriptors).
  std::atomic<std::int64_t> accept_paused{0};
  /// TLS (GatewayOptions::tls): handshakes completed, handshakes that failed (bad input, a
  /// stall past handshake_timeout, a client that went away, no common protocol), plain
  /// connections a TLS-only port refused, and certificate reloads that failed.
  std::atomic<std::uint64_t> tls_handshakes{0};
  std::atomic<std::uint64_t> tls_handshake_failures{0};
  std::atomic<std::uint64_t> tls_plain_refused{0};
  std::atomic<std::uint64_t> tls_reloads{0};
  std::atomic<std::uint64_t> tls_reload_failures{0};
  /// The process's file-descriptor limit (RLIMIT_NOFILE, soft), read at start.
  std::atomic<std::int64_t> fd_limit{0};

  void count_request(std::string_view route, unsigned status);
  /// The Prometheus text exposition (format 0.0.4) of these counters, the engine's and the bus's
  /// (a LocalBus's or a RedisBus's stats(); nothing of a bus of another kind).
  std::string render(const EngineStats* engine, const EventBus* bus = nullptr) const;
  /// The topic hub's gauges and counters (see topic_hub.hpp), appended to `out`.
  static void render_topic_hub(std::string& out, const TopicHubStats& hub);

 private:
  mutable std::mutex mutex_;
  std::map<std::pair<std::string, unsigned>, std::uint64_t> requests_;
};

}  // namespace pushbook::detail
