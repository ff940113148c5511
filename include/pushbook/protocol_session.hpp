// The push protocol v1 (docs/protocol.md) for a host's own WebSocket server: a Python web app
// (pushbook.aiohttp, pushbook.asgi), or a C++ server that is not Beast. Sans-I/O: the host
// hands in each text message the client sent and takes out the frames to send; events arrive on
// the bus's threads and wake the host, which then takes them. The protocol logic is the same code
// the built-in gateway runs (booking, subscribing with resume, cancel, refresh, rate limit,
// subscription cap, slow-consumer policy), so a client cannot tell the hosts apart.
//
// The host authenticates its users its own way (a session cookie, its own tokens) and passes the
// user id; the per-topic rule (pushbook::default_topic_rule) or GatewayOptions::authorize decides
// what that user may follow.
//
//   auto host = pushbook::ProtocolHost::create(engine, bus).value();
//   pushbook::ProtocolSession session(host, "alice", {}, [&] { /* schedule my writer */ });
//   session.feed(R"({"id":1,"op":"book","resource":"hall"})");
//   for (auto out = session.poll(); !out.empty(); out = session.poll()) {
//     if (!out.text.empty()) my_socket.send_text(out.text);
//     if (out.close) my_socket.close(out.close->code, out.close->reason);
//   }
#pragma once

#include <pushbook/booking_engine.hpp>
#include <pushbook/error.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/push_gateway.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace pushbook {

/// What the sessions of one host share: the engine, the bus, one bus subscription per topic for
/// all of them (fanned out to the sessions, each event serialized once), the limits and the
/// counters. Thread-safe.
class ProtocolHost {
 public:
  /// The fields of `options` that apply: authorize, max_message_bytes, max_subscriptions,
  /// rate_limit_per_second, rate_limit_burst, max_queued_bytes, slow_consumer,
  /// token_refresh_grace, and secret or keys with token_leeway (to verify the token of a
  /// `refresh` message; without them `refresh` is answered "unauthorized", and hosts that do not
  /// pass a token expiry to their sessions never need it). The others (ports, threads, TLS...)
  /// belong to the built-in gateway and are ignored.
  /// Errors: bad_request (no engine or bus, limits not positive, secret and keys both given).
  static result<std::shared_ptr<ProtocolHost>> create(std::shared_ptr<BookingEngine> engine, EventBusPtr bus,
                                                      GatewayOptions options = {});
  ~ProtocolHost();
  ProtocolHost(const ProtocolHost&) = delete;
  ProtocolHost& operator=(const ProtocolHost&) = delete;

  /// The host is shutting down: `book` is refused from now on ("overloaded": book again once
  /// reconnected) while the bookings in flight are decided and pushed.
  void drain();
  /// The sessions' counters (the gateway's names: pushbook_connections{kind="websocket"}, messages
  /// pushed, drops, rate limits...), the engine's and the bus's, in Prometheus text format.
  std::string metrics_text() const;
  /// Open sessions (WebSocket clients and event streams).
  std::size_t sessions() const;

  struct impl;

 private:
  explicit ProtocolHost(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
  friend class ProtocolSession;
};

/// One client's protocol state. feed(), poll() and close() may be called from any thread (they
/// are serialized inside); none of them waits for the bus, and only `cancel` waits for the
/// store's commit (as in the gateway).
class ProtocolSession {
 public:
  using clock = std::chrono::steady_clock;

  /// `user`: who the host authenticated. `token_expires`: when the credential the host checked
  /// expires, if it does: the client is then told (notice "token_expired") and has
  /// token_refresh_grace to send a `refresh`, after which poll() closes it with 4001; nullopt:
  /// never. `wake` is called, on any thread (an engine or bus thread, or inside feed()), when
  /// poll() has something new: it must only schedule the host's writer (never call into the
  /// session) and may be called more often than needed.
  ProtocolSession(std::shared_ptr<ProtocolHost> host, std::string user,
                  std::optional<std::chrono::system_clock::time_point> token_expires,
                  std::function<void()> wake);
  /// A Server-Sent Events stream of one topic for `user` (GET /v1/events in docs/protocol.md):
  /// `last_event_id` is the request's Last-Event-ID header if it has one (it wins), else `since`
  /// and `epoch` are its ?since= and ?epoch= ("" when absent). poll() then gives the stream's
  /// bytes: "retry: 2000" first, then one message per event ("id: EPOCH:SEQ", "data: <JSON>"),
  /// and a close when the stream ends (a slow client: 1013; the bus ended the subscription:
  /// 1011): the host then ends the response, and the client's EventSource resumes with
  /// Last-Event-ID. Idle streams need a comment line (": keep-alive") now and then through
  /// proxies: that is the host's, as is the HTTP head (Content-Type: text/event-stream,
  /// Cache-Control: no-store). feed() does nothing on it.
  /// Errors, to answer as HTTP: bad_request (400: an invalid topic, a bad resume point),
  /// forbidden (403: the user may not see the topic), and the bus's subscribe errors.
  static result<std::unique_ptr<ProtocolSession>> events(std::shared_ptr<ProtocolHost> host, std::string user,
                                                         const std::string& topic,
                                                         std::optional<std::string_view> last_event_id,
                                                         std::string_view since, std::string_view epoch,
                                                         std::function<void()> wake);
  /// Ends the session (as close()).
  ~ProtocolSession();
  ProtocolSession(const ProtocolSession&) = delete;
  ProtocolSession& operator=(const ProtocolSession&) = delete;

  /// One text message from the client (a JSON request). Longer than max_message_bytes: the
  /// session closes with 1009. Every answer, error included, comes out of poll().
  void feed(std::string_view text, clock::time_point now = clock::now());
  /// A binary message from the client: counted against the rate limit, then refused
  /// ("bad_request").
  void feed_binary(clock::time_point now = clock::now());

  struct Close {
    std::uint16_t code = 1000;
    std::string reason;
  };
  struct Output {
    /// One frame to send: protocol messages separated by '\n' (as the gateway sends them).
    std::string text;
    /// Close the WebSocket with this code and reason, after `text`. Comes once; the session
    /// is closed from then on.
    std::optional<Close> close;
    bool empty() const noexcept { return text.empty() && !close; }
  };
  /// Runs what arrived since the last call (booking answers, the token deadline when it is due)
  /// and returns the next frame to send (at most `max_frame` bytes, at least one message).
  /// Empty: nothing to send now; `wake` is called when there is. Call it until it returns empty.
  Output poll(clock::time_point now = clock::now(), std::size_t max_frame = 256 * 1024);
  /// When poll() should be called even without a wake (the token deadline), if ever.
  std::optional<clock::time_point> next_deadline() const;

  /// The client went away (or the host hangs up): the subscriptions end, nothing more comes out
  /// of poll(). Idempotent.
  void close();
  bool closed() const;
  const std::string& user() const noexcept;
  /// The subscriptions the client holds now.
  std::size_t subscriptions() const;

  struct impl;

 private:
  ProtocolSession() = default;
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook
