// The wire protocol v1 without sockets (docs/protocol.md): parsing client frames, deciding what
// to do, and the JSON the server sends. The I/O layer (websocket_session, http_session,
// sse_session) only carries these decisions out, so all of this is tested without a socket
// (tests/protocol_test.cpp).
#pragma once

#include <pushbook/auth.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/push_gateway.hpp>

#include "detail/json_text.hpp"
#include "gateway/metrics.hpp"
#include "gateway/topic_hub.hpp"

#include <boost/json/object.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace pushbook::detail {

using steady = std::chrono::steady_clock;

/// A wire error code ("bad_request", ...) and the HTTP status that goes with it.
struct WireError {
  const char* code;
  unsigned http_status;
};
/// Maps pushbook's error codes onto the protocol's stable error codes.
WireError wire_error(const std::error_code& ec);

/// {"error":{"code":...,"message":...}} for HTTP bodies.
std::string http_error_body(std::string_view code, std::string_view message);
/// {"type":"reply","id":ID,"ok":true,"result":{...}}
std::string reply_ok(const boost::json::value& id, const boost::json::object& result);
/// reply_ok with the book ACK as the result: {"booking_id":...,"status":...,"seq":version
/// [,"replayed":true]}, written out.
std::string reply_booked(const boost::json::value& id, const Ack& ack);
/// {"type":"reply","id":ID,"ok":false,"error":{"code":...,"message":...}}
std::string reply_error(const boost::json::value& id, std::string_view code, std::string_view message);

/// Bookings submitted by connections whose answer has not been handled (or dropped) yet: the
/// gateway waits for them before it destroys its io_contexts, since each answer is posted there.
class PendingSubmits {
 public:
  void begin() {
    std::lock_guard lock(mutex_);
    ++count_;
  }
  void end() {
    std::lock_guard lock(mutex_);
    if (--count_ == 0) zero_.notify_all();
  }
  /// True when none is pending by `deadline`.
  bool wait_zero(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock lock(mutex_);
    return zero_.wait_until(lock, deadline, [&] { return count_ == 0; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable zero_;
  std::size_t count_ = 0;
};

/// The keys tokens are verified with, swapped whole by PushGateway::set_keys(). A verification
/// takes the current set and uses it without a lock; the set itself is immutable.
class CurrentKeys {
 public:
  std::shared_ptr<const KeySet> get() const {
    std::lock_guard lock(mutex_);
    return keys_;
  }
  void set(std::shared_ptr<const KeySet> keys) {
    std::lock_guard lock(mutex_);
    keys_.swap(keys);  // the old set is released with the parameter, outside the lock
  }

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<const KeySet> keys_;
};

/// What the protocol asks of the engine and the bus behind it. The node's default is the
/// engine and the topic hub themselves (GatewayContext without a `backend`); a test puts a fake
/// here (tests/protocol_test.cpp, "without an engine") and drives ConnectionLogic with no engine
/// and no bus at all.
class ProtocolBackend {
 public:
  virtual ~ProtocolBackend() = default;
  /// BookingEngine::submit_async: `done` once, on any thread, possibly before this returns.
  virtual void submit_async(BookingRequest request, std::function<void(result<Ack>)> done) = 0;
  /// BookingEngine::get.
  virtual result<Booking> get(std::string_view booking_id) = 0;
  /// cancel_idempotent (a booking cancelled already is answered as it is).
  virtual result<Booking> cancel(std::string_view booking_id) = 0;
  /// Follows an exact topic (TopicHub::subscribe's contract: callbacks inline on the delivering
  /// thread, the bus's resume rules, a snapshot of booking topics from the store).
  virtual result<Subscription> follow(const std::string& topic, DeliveryCallback callback,
                                      SubscribeOptions options) = 0;
};

/// The token keys `options` names: `keys`, or a set of one from `secret`, or null (neither).
/// Errors: bad_request (both given, or an empty key set).
result<std::shared_ptr<const KeySet>> keys_from_options(GatewayOptions& options);

/// Everything the connections of one gateway share. Immutable after start (but for the keys,
/// which swap atomically).
struct GatewayContext {
  EventBusPtr bus;
  /// The node's one bus subscription per topic, shared by its connections (see topic_hub.hpp).
  std::shared_ptr<TopicHub> hub;
  std::shared_ptr<BookingEngine> engine;
  GatewayOptions options;
  GatewayMetrics* metrics = nullptr;
  std::shared_ptr<PendingSubmits> pending_submits = std::make_shared<PendingSubmits>();
  /// Set when the gateway begins to stop: new bookings are refused while the ones in flight are
  /// decided and pushed.
  std::shared_ptr<std::atomic<bool>> draining = std::make_shared<std::atomic<bool>>(false);
  /// The keys in use; the set is null only in dev_insecure mode without keys.
  std::shared_ptr<CurrentKeys> keys = std::make_shared<CurrentKeys>();
  /// When set, the protocol's engine and bus calls (below) go to it instead, and `engine`, `bus`
  /// and `hub` may be null (a test's fake: see ProtocolBackend).
  std::shared_ptr<ProtocolBackend> backend;

  /// The engine's submit_async (or the backend's).
  void submit_async(BookingRequest request, std::function<void(result<Ack>)> done) const;
  /// The engine's get (or the backend's).
  result<Booking> booking(std::string_view booking_id) const;
  /// cancel_idempotent on the engine (or the backend's cancel).
  result<Booking> cancel(std::string_view booking_id) const;

  /// Verifies a token with the current keys (or, in dev_insecure mode without keys, reads its
  /// "sub" unverified).
  result<TokenClaims> verify(std::string_view token) const;
  /// Follows an exact topic for a connection: through the hub (callbacks run on the delivering
  /// thread, as with inline_executor()), or straight on the bus when there is no hub; a booking
  /// topic's snapshot comes from the store (snapshot_source). Or the backend's follow.
  result<Subscription> follow(const std::string& topic, DeliveryCallback callback,
                              SubscribeOptions options) const;
  /// The bus's history of `topic` after `since_seq` where the bus holds it in memory
  /// (EventBus::history_if_local: LocalBus), without waiting; nullopt otherwise (RedisBus, a
  /// backend).
  std::optional<std::vector<EventPtr>> history_if_local(std::string_view topic,
                                                        std::uint64_t since_seq) const;
  /// Whether `user` may subscribe to `topic` (custom hook or default_topic_rule).
  bool may_subscribe(std::string_view user, std::string_view topic) const;
};

/// Where a connection's output goes. Implemented by the sessions; every call is non-blocking and
/// thread-safe (events arrive on publisher threads).
class ConnectionSink {
 public:
  virtual ~ConnectionSink() = default;
  /// A reply or notice: counted against the byte bound, never dropped.
  virtual void send_text(std::shared_ptr<const std::string> message) = 0;
  /// An event (shared serialized bytes): the slow-consumer policy may drop it.
  virtual void send_event(const EventPtr& event, bool snapshot) = 0;
  /// send_event() of an event this connection alone is sent (a booking's decision sent from
  /// history to the connection that booked it): its wire form is not kept with the event
  /// (Event::wire_once).
  virtual void send_event_once(const EventPtr& event) { send_event(event, false); }
  /// Closes the connection with a WebSocket close code and reason.
  virtual void close(std::uint16_t code, std::string reason) = 0;
  /// Runs `fn` on the connection's strand, later; not at all once the connection has finished.
  virtual void post(std::function<void()> fn) = 0;
};

/// Where a subscriber to `topic` gets the topic's state when the bus has nothing of it (after a
/// restart): a booking topic's state comes from the engine's store. Empty for other topics.
std::function<std::shared_ptr<const boost::json::value>()> snapshot_source(const GatewayContext& ctx,
                                                                           std::string_view topic);

/// Cancels a booking; one already cancelled is answered as it is (a cancel sent again, by a client
/// or a balancer after a lost answer, gets the answer the first one got). Other errors as
/// BookingEngine::cancel.
result<Booking> cancel_idempotent(BookingEngine& engine, std::string_view booking_id);

/// One follower's filter of booking states (a copy shares the state): on a `booking/<id>` topic
/// a state whose data's "version" is at most the highest this follower was given, or `known` (the
/// version a book ACK reported), or below the `since` the client resumes from, is stale, and not
/// sent (booking topics are numbered by version in every epoch, so `since` is the version the
/// client has: an older state is never sent, that one may come again as the snapshot the bus's
/// rules give). In a cluster a snapshot read from the
/// store can be ahead of the bus: the booking was decided on another node, which is still
/// publishing its events; the events the snapshot already contains then arrive after it. Other
/// topics: nothing is stale.
class BookingVersionFilter {
 public:
  BookingVersionFilter(std::string_view topic, std::optional<std::uint64_t> since, std::uint64_t known = 0);
  /// Whether `d` (an event or snapshot) is stale; when it is not, it becomes the highest given.
  /// A follower's deliveries never run concurrently (they may on different threads in turn).
  bool stale(const Delivery& d) const;

 private:
  std::shared_ptr<std::atomic<std::uint64_t>> highest_;
};

/// Submits `request` without blocking the calling I/O thread on the store, and hands the answer
/// to `then` on the caller's strand: at once when the engine answered before submit_async()
/// returned (bad input, an inline store such as MemoryStore: no thread hop), otherwise through
/// `post`, which must run its function on that strand.
/// Counted in `ctx.pending_submits` until `then` ran or was dropped.
void submit_on_strand(const GatewayContext& ctx, BookingRequest request,
                      std::function<void(std::function<void()>)> post, std::function<void(result<Ack>)> then);

/// Where an event stream resumes: after event `since` of the numbering `epoch` (each optional).
struct ResumePoint {
  std::optional<std::uint64_t> since;
  std::optional<std::uint32_t> epoch;
};
/// The resume point of GET /v1/events: `last_event_id` (the Last-Event-ID header: "EPOCH:SEQ" as
/// sent in "id:", or a bare SEQ) when there is one, else `since` (SEQ) with an optional `epoch`
/// (8 hex digits); empty strings are absent. Errors: bad_request.
result<ResumePoint> parse_resume_point(std::optional<std::string_view> last_event_id, std::string_view since,
                                       std::string_view epoch);

/// An SSE message of an event: "id: EPOCH:SEQ\ndata: <the event's JSON>\n", without the blank
/// line that ends it (the writer adds it, or joins messages with it).
std::string sse_event(const Event& event, bool snapshot);

/// Follows `topic` for an event stream (SSE): events and snapshots (stale booking states left
/// out, as for a WebSocket) to sink->send_event, a gap marker to sink->send_text, the end of the
/// subscription to sink->close(1011, why). The caller checked the topic and the user's right.
result<Subscription> follow_for_events(const GatewayContext& ctx, const std::string& topic,
                                       ResumePoint resume, std::weak_ptr<ConnectionSink> sink);

/// The per-connection protocol state of a WebSocket client: identity, subscriptions, rate
/// limit, token expiry. Called on the connection's strand only (not thread-safe itself).
class ConnectionLogic {
 public:
  ConnectionLogic(std::shared_ptr<const GatewayContext> ctx, std::weak_ptr<ConnectionSink> sink,
                  std::string user, std::optional<std::chrono::system_clock::time_point> token_expires);
  /// Cancels every subscription.
  ~ConnectionLogic();
  ConnectionLogic(const ConnectionLogic&) = delete;
  ConnectionLogic& operator=(const ConnectionLogic&) = delete;

  /// Handles one client frame (a JSON object as text).
  void on_message(std::string_view text, steady::time_point now = steady::now());
  /// A binary frame: counted against the rate limit like any message, then refused.
  void on_binary(steady::time_point now = steady::now());
  /// When on_deadline() wants to be called next (token expiry), if ever.
  std::optional<steady::time_point> next_deadline() const noexcept { return deadline_; }
  void on_deadline(steady::time_point now = steady::now());
  /// Cancels every subscription (no more events reach the sink).
  void unsubscribe_all();

  const std::string& user() const noexcept { return user_; }
  std::size_t subscriptions() const noexcept { return subscriptions_.size(); }

 private:
  void reply(const boost::json::value& id, const boost::json::object& result);
  void fail(const boost::json::value& id, std::string_view code, std::string_view message);
  void fail(const boost::json::value& id, const Error& e);
  bool take_token(steady::time_point now);
  /// Applies the rate limit to one message: false when it is refused (and answered or closed).
  bool admit(steady::time_point now);
  void handle(const boost::json::object& msg, const boost::json::value& id, std::string_view op);
  void op_book(const boost::json::object& msg, const boost::json::value& id);
  /// `until_decision`: the book asked "follow":"decision" (the subscription ends after the decision).
  void on_booked(const boost::json::value& id, result<Ack> ack, bool until_decision);
  void op_subscribe(const boost::json::object& msg, const boost::json::value& id);
  void op_unsubscribe(const boost::json::object& msg, const boost::json::value& id);
  void op_cancel(const boost::json::object& msg, const boost::json::value& id);
  void op_refresh(const boost::json::object& msg, const boost::json::value& id);
  /// Subscribes the sink to `topic` (replacing an existing subscription to it). With a
  /// `known_version` (booking topics: the version a book ACK reported), a booking state whose
  /// data's "version" is at most the highest the client has (that one, then each sent) is not
  /// sent: the client has it, or a newer one. With `until_decision` (a booking topic), the
  /// subscription ends by itself once a decided state (any status but processing) was sent.
  void subscribe(const std::string& topic, std::optional<std::uint64_t> since,
                 std::optional<std::uint32_t> epoch = std::nullopt, std::uint64_t known_version = 0,
                 bool until_decision = false);
  /// For a "follow":"decision" book: when the bus holds the booking's events after `known` in
  /// memory, without a gap and up to a decision, sends them and returns true (no subscription is
  /// needed); else sends nothing and returns false.
  bool send_decided(const std::string& topic, std::uint64_t known);
  void set_expiry(std::optional<std::chrono::system_clock::time_point> expires, steady::time_point now);

  std::shared_ptr<const GatewayContext> ctx_;
  std::weak_ptr<ConnectionSink> sink_;
  std::string user_;
  struct Followed {
    Subscription subscription;
    std::uint64_t generation = 0;  // which subscribe() made it (an ending one checks it is still the same)
  };
  std::map<std::string, Followed, std::less<>> subscriptions_;
  std::uint64_t generations_ = 0;
  // Token bucket.
  double tokens_;
  steady::time_point refilled_;
  // Refused messages, forgiven at the allowed rate: a sustained flood piles them up past the
  // burst (close 1008) even though each refill lets a message through.
  double strikes_ = 0;
  // Token expiry: at deadline_, either warn (then grace) or close.
  std::optional<steady::time_point> deadline_;
  bool in_grace_ = false;
};

}  // namespace pushbook::detail
