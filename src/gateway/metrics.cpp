#include "gateway/metrics.hpp"

#include <pushbook/redis_bus.hpp>

#include <fmt/format.h>

namespace pushbook::detail {

void GatewayMetrics::count_request(std::string_view route, unsigned status) {
  std::lock_guard lock(mutex_);
  ++requests_[{std::string(route), status}];
}

namespace {
void metric(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  fmt::format_to(std::back_inserter(out), "# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}
template <class T>
void value(std::string& out, std::string_view name, T v, std::string_view labels = {}) {
  if (labels.empty())
    fmt::format_to(std::back_inserter(out), "{} {}\n", name, v);
  else
    fmt::format_to(std::back_inserter(out), "{}{{{}}} {}\n", name, labels, v);
}
void summary(std::string& out, std::string_view name, std::string_view help, const LatencySummary& s) {
  metric(out, name, "summary", help);
  value(out, name, static_cast<double>(s.p50_ns) / 1e9, "quantile=\"0.5\"");
  value(out, name, static_cast<double>(s.p90_ns) / 1e9, "quantile=\"0.9\"");
  value(out, name, static_cast<double>(s.p99_ns) / 1e9, "quantile=\"0.99\"");
  value(out, fmt::format("{}_sum", name), s.mean_ns * static_cast<double>(s.count) / 1e9);
  value(out, fmt::format("{}_count", name), s.count);
}

// The counters both buses keep, under the same names whichever bus it is.
template <class Stats>
void common_bus_metrics(std::string& out, const Stats& s) {
  metric(out, "pushbook_bus_published_total", "counter", "Events published through this node's bus.");
  value(out, "pushbook_bus_published_total", s.published);
  metric(out, "pushbook_bus_delivered_total", "counter", "Deliveries made to this node's bus subscribers.");
  value(out, "pushbook_bus_delivered_total", s.delivered);
  metric(out, "pushbook_bus_dropped_total", "counter",
         "Events dropped from bus subscriber queues that fell behind (delivered as a gap).");
  value(out, "pushbook_bus_dropped_total", s.dropped);
  metric(out, "pushbook_bus_slow_consumer_ends_total", "counter",
         "Bus subscriptions ended for falling behind (errc::slow_consumer).");
  value(out, "pushbook_bus_slow_consumer_ends_total", s.slow_consumer_ends);
  metric(out, "pushbook_bus_subscriptions", "gauge", "Live subscriptions to this node's bus.");
  value(out, "pushbook_bus_subscriptions", s.subscriptions);
}

void bus_metrics(std::string& out, const EventBus& bus) {
  // EventBus has no stats of its own (its interface is the contract every bus keeps): ask the
  // buses pushbook knows; a host's own bus shows nothing here.
  if (const auto* local = dynamic_cast<const LocalBus*>(&bus)) {
    const auto s = local->stats();
    metric(out, "pushbook_bus_info", "gauge", "The kind of event bus this node uses.");
    value(out, "pushbook_bus_info", 1, "kind=\"local\"");
    common_bus_metrics(out, s);
    metric(out, "pushbook_bus_topics", "gauge", "Topics the LocalBus keeps (history, last value, counter).");
    value(out, "pushbook_bus_topics", s.topics);
  } else if (const auto* redis = dynamic_cast<const RedisBus*>(&bus)) {
    const auto s = redis->stats();
    // Both connections (commands and subscriber) up; a zero wait only reads the state.
    const bool connected = redis->wait_connected(std::chrono::milliseconds(0));
    metric(out, "pushbook_bus_info", "gauge", "The kind of event bus this node uses.");
    value(out, "pushbook_bus_info", 1, "kind=\"redis\"");
    common_bus_metrics(out, s);
    metric(out, "pushbook_bus_connected", "gauge", "1 while both connections to Redis are established.");
    value(out, "pushbook_bus_connected", connected ? 1 : 0);
    metric(out, "pushbook_bus_received_total", "counter", "Event messages received from Redis.");
    value(out, "pushbook_bus_received_total", s.received);
    metric(out, "pushbook_bus_channels", "gauge", "Redis channels and patterns this node is subscribed to.");
    value(out, "pushbook_bus_channels", s.channels);
    metric(out, "pushbook_bus_reconnects_total", "counter",
           "Connections to Redis established again after the first one.");
    value(out, "pushbook_bus_reconnects_total", s.reconnects);
    metric(out, "pushbook_bus_publish_failures_total", "counter",
           "Publishes that failed because Redis was unreachable (bus_unavailable).");
    value(out, "pushbook_bus_publish_failures_total", s.publish_failures);
    metric(out, "pushbook_bus_resyncs_total", "counter",
           "Subscribers caught up (from history or a snapshot) after a reconnect.");
    value(out, "pushbook_bus_resyncs_total", s.resyncs);
  }
}
}  // namespace

std::string GatewayMetrics::render(const EngineStats* engine, const EventBus* bus) const {
  std::string out;
  out.reserve(4096);
  metric(out, "pushbook_connections", "gauge", "Open client connections by kind.");
  value(out, "pushbook_connections", websocket_connections.load(), "kind=\"websocket\"");
  value(out, "pushbook_connections", sse_connections.load(), "kind=\"sse\"");
  value(out, "pushbook_connections", http_connections.load(), "kind=\"http\"");
  metric(out, "pushbook_connections_total", "counter", "Connections accepted.");
  value(out, "pushbook_connections_total", connections_total.load());
  metric(out, "pushbook_connections_refused_total", "counter",
         "Connections refused at the connection limit.");
  value(out, "pushbook_connections_refused_total", connections_refused.load());
  metric(out, "pushbook_subscriptions", "gauge", "Topic subscriptions held by clients.");
  value(out, "pushbook_subscriptions", subscriptions.load());
  metric(out, "pushbook_messages_pushed_total", "counter",
         "Messages (events, replies, notices) sent to clients.");
  value(out, "pushbook_messages_pushed_total", messages_pushed.load());
  metric(out, "pushbook_frames_written_total", "counter", "WebSocket frames and SSE writes sent to clients.");
  value(out, "pushbook_frames_written_total", frames_written.load());
  metric(out, "pushbook_bytes_pushed_total", "counter", "Payload bytes sent to clients.");
  value(out, "pushbook_bytes_pushed_total", bytes_pushed.load());
  metric(out, "pushbook_queued_bytes", "gauge", "Bytes waiting in per-connection send queues.");
  value(out, "pushbook_queued_bytes", queued_bytes.load());
  metric(out, "pushbook_slow_consumer_disconnects_total", "counter",
         "Connections closed for falling behind.");
  value(out, "pushbook_slow_consumer_disconnects_total", slow_consumer_disconnects.load());
  metric(out, "pushbook_dropped_messages_total", "counter",
         "Events dropped for slow consumers (gap policy).");
  value(out, "pushbook_dropped_messages_total", dropped_messages.load());
  metric(out, "pushbook_client_messages_total", "counter", "Messages received from WebSocket clients.");
  value(out, "pushbook_client_messages_total", client_messages.load());
  metric(out, "pushbook_client_errors_total", "counter", "Client messages answered with an error.");
  value(out, "pushbook_client_errors_total", client_errors.load());
  metric(out, "pushbook_rate_limited_total", "counter", "Client messages refused by the rate limit.");
  value(out, "pushbook_rate_limited_total", rate_limited.load());
  metric(out, "pushbook_user_rate_limited_total", "counter",
         "HTTP requests refused by the per-user rate limit.");
  value(out, "pushbook_user_rate_limited_total", user_rate_limited.load());
  metric(out, "pushbook_accept_failures_total", "counter",
         "Accepts that failed (typically out of file descriptors); the listener backs off 100 ms.");
  value(out, "pushbook_accept_failures_total", accept_failures.load());
  metric(out, "pushbook_accept_paused", "gauge", "1 while the listener backs off after a failed accept.");
  value(out, "pushbook_accept_paused", accept_paused.load());
  metric(out, "pushbook_tls_handshakes_total", "counter", "TLS handshakes completed.");
  value(out, "pushbook_tls_handshakes_total", tls_handshakes.load());
  metric(out, "pushbook_tls_handshake_failures_total", "counter",
         "TLS handshakes that failed (bad input, timeout, client gone, no common protocol).");
  value(out, "pushbook_tls_handshake_failures_total", tls_handshake_failures.load());
  metric(out, "pushbook_tls_plain_refused_total", "counter",
         "Plain (not TLS) connections refused by a TLS-only port.");
  value(out, "pushbook_tls_plain_refused_total", tls_plain_refused.load());
  metric(out, "pushbook_tls_reloads_total", "counter", "Certificate and key reloads, by result.");
  value(out, "pushbook_tls_reloads_total", tls_reloads.load(), R"(result="ok")");
  value(out, "pushbook_tls_reloads_total", tls_reload_failures.load(), R"(result="failed")");
  metric(out, "pushbook_fd_limit", "gauge", "The process's open file limit (RLIMIT_NOFILE).");
  value(out, "pushbook_fd_limit", fd_limit.load());
  metric(out, "pushbook_http_requests_total", "counter", "HTTP requests by route and status.");
  {
    std::lock_guard lock(mutex_);
    for (const auto& [key, n] : requests_)
      value(out, "pushbook_http_requests_total", n,
            fmt::format("route=\"{}\",status=\"{}\"", key.first, key.second));
  }
  if (engine) {
    metric(out, "pushbook_bookings_total", "counter", "Bookings by outcome.");
    value(out, "pushbook_bookings_total", engine->accepted, "outcome=\"accepted\"");
    value(out, "pushbook_bookings_total", engine->confirmed, "outcome=\"confirmed\"");
    value(out, "pushbook_bookings_total", engine->rejected, "outcome=\"rejected\"");
    value(out, "pushbook_bookings_total", engine->held, "outcome=\"held\"");
    value(out, "pushbook_bookings_total", engine->cancelled, "outcome=\"cancelled\"");
    value(out, "pushbook_bookings_total", engine->released, "outcome=\"released\"");
    value(out, "pushbook_bookings_total", engine->expired, "outcome=\"expired\"");
    value(out, "pushbook_bookings_total", engine->overloaded, "outcome=\"overloaded\"");
    value(out, "pushbook_bookings_total", engine->quota_exceeded, "outcome=\"quota_exceeded\"");
    metric(out, "pushbook_bookings_in_flight", "gauge", "Bookings accepted and not decided yet.");
    value(out, "pushbook_bookings_in_flight", engine->in_flight);
    metric(out, "pushbook_engine_queue_depth", "gauge", "Bookings waiting for an engine worker.");
    value(out, "pushbook_engine_queue_depth", engine->queue_depth);
    metric(out, "pushbook_publish_failures_total", "counter",
           "Publishes the event bus refused (e.g. Redis unreachable); the events are kept and retried.");
    value(out, "pushbook_publish_failures_total", engine->publish_failures);
    metric(out, "pushbook_publish_retries_total", "counter",
           "Events published from the backlog after a failure.");
    value(out, "pushbook_publish_retries_total", engine->publish_retries);
    metric(out, "pushbook_publish_backlog", "gauge",
           "Events not yet taken by the bus: in flight, waiting behind an earlier event of their topic, or "
           "to be published again.");
    value(out, "pushbook_publish_backlog", engine->publish_backlog);
    metric(out, "pushbook_publish_dropped_total", "counter",
           "Events given up (backlog full); a durable store relays their bookings at the next start.");
    value(out, "pushbook_publish_dropped_total", engine->publish_dropped);
    metric(out, "pushbook_relayed_total", "counter",
           "Booking versions found unpublished at start and relayed.");
    value(out, "pushbook_relayed_total", engine->relayed);
    summary(out, "pushbook_booking_ack_latency_seconds", "From submit to ACK.", engine->ack_latency);
    summary(out, "pushbook_booking_decision_latency_seconds", "From submit to the published decision.",
            engine->decision_latency);
  }
  if (bus) bus_metrics(out, *bus);
  return out;
}

void GatewayMetrics::render_topic_hub(std::string& out, const TopicHubStats& hub) {
  metric(out, "pushbook_hub_topics", "gauge",
         "Topics this node follows on the bus: one bus subscription each, shared by its connections.");
  value(out, "pushbook_hub_topics", hub.topics);
  metric(out, "pushbook_hub_followers", "gauge", "Connections' subscriptions served from those.");
  value(out, "pushbook_hub_followers", hub.followers);
  metric(out, "pushbook_hub_private_subscriptions", "gauge",
         "Connections' subscriptions with a bus subscription of their own (a resume older than the "
         "node's recent events of the topic).");
  value(out, "pushbook_hub_private_subscriptions", hub.private_subscriptions);
  metric(out, "pushbook_hub_shared_joins_total", "counter",
         "Subscriptions to a topic the node already followed (no bus call).");
  value(out, "pushbook_hub_shared_joins_total", hub.shared_joins);
}

}  // namespace pushbook::detail
