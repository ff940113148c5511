// pushbook/event_bus.hpp: topic publish/subscribe with per-topic sequence numbers, history,
// resume by sequence number and bounded subscriber queues.
//
// EventBus is the interface the engine and the gateway use; LocalBus is the in-process
// implementation. A bus that spans machines (e.g. Redis-backed) implements the same interface.
#pragma once

#include <pushbook/error.hpp>
#include <pushbook/executor.hpp>
#include <pushbook/export.hpp>

#include <boost/json/value.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace pushbook {

/// One published event: immutable once published and shared by every subscriber.
class PUSHBOOK_EXPORT Event {
 public:
  Event(std::string topic, std::uint64_t seq, std::chrono::system_clock::time_point time,
        std::shared_ptr<const boost::json::value> data, std::uint32_t epoch = 0);
  /// An event whose payload is kept as JSON text (EventBus::publish_json): `json_text` must hold
  /// exactly one valid JSON value (publish_json checks; this constructor does not). data() parses
  /// it on first use; the wire form takes the text as it is.
  Event(std::string topic, std::uint64_t seq, std::chrono::system_clock::time_point time,
        std::shared_ptr<const std::string> json_text, std::uint32_t epoch = 0);
  /// The same with the topic's name shared (non-null): a bus gives every event of a topic the one
  /// copy it keeps (LocalBus), instead of a string each.
  Event(std::shared_ptr<const std::string> topic, std::uint64_t seq,
        std::chrono::system_clock::time_point time, std::shared_ptr<const boost::json::value> data,
        std::uint32_t epoch = 0);
  Event(std::shared_ptr<const std::string> topic, std::uint64_t seq,
        std::chrono::system_clock::time_point time, std::shared_ptr<const std::string> json_text,
        std::uint32_t epoch = 0);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  const std::string& topic() const noexcept { return *topic_; }
  /// Position in its topic: 1 for the first event ever published to the topic, then +1 (or the
  /// number its publisher gave it, PublishOptions::seq: always above the previous one).
  std::uint64_t seq() const noexcept { return seq_; }
  /// The numbering `seq` belongs to. A topic's numbering restarts (seq 1 again) when its bus
  /// restarts or forgets the topic; it then gets another epoch, so that a subscriber resuming
  /// with an old seq can tell (SubscribeOptions::since_epoch). Opaque; on the wire as 8 hex digits.
  std::uint32_t epoch() const noexcept { return epoch_; }
  /// When it was published.
  std::chrono::system_clock::time_point time() const noexcept { return time_; }
  /// The payload. An event published as text (data_text()) parses it on the first call, once
  /// (thread-safe; std::bad_alloc is the one error), and keeps the value as long as it lives.
  const boost::json::value& data() const { return *shared_data(); }
  /// The payload, shareable: events published with the same pointer share one JSON value.
  const std::shared_ptr<const boost::json::value>& shared_data() const;
  /// The payload's JSON text when the event was published as text (EventBus::publish_json),
  /// else null. Events published with the same text share it.
  const std::shared_ptr<const std::string>& data_text() const noexcept { return text_; }

  /// The event in pushbook's wire form, serialized once on first use and then shared:
  /// {"type":"event","topic":"...","seq":N,"epoch":"<8 hex digits>","ts":<unix ms>,"data":{...}}
  /// With `snapshot`, the same object with "snapshot":true (it carries current state).
  /// Thread-safe (a thread that asks while another is serializing gets an equal copy of its own).
  std::shared_ptr<const std::string> wire(bool snapshot = false) const;
  /// wire() for a caller that sends the event once, to one client: the form kept with the event
  /// when it was made already, else one made for this caller and not kept (an event that only
  /// one connection is sent, such as a booking's decision sent to the client that booked it,
  /// then holds no serialized copy of itself for as long as the bus keeps it).
  std::shared_ptr<const std::string> wire_once(bool snapshot = false) const;

 private:
  std::shared_ptr<const std::string> build_wire(bool snapshot) const;
  // What an event needs only once it is parsed or fanned out (its JSON value, its wire forms):
  // made on first use, so that an event kept in history and sent to one client at most (a
  // booking's) is 64 bytes, 96 with its shared_ptr's block, where these members inline made 112
  // and 144.
  struct Extras;
  Extras& extras() const;

  std::shared_ptr<const std::string> topic_;
  std::uint64_t seq_;
  std::chrono::system_clock::time_point time_;
  // The payload's text when published as text; the value (Extras::data) otherwise.
  std::shared_ptr<const std::string> text_;
  // Made by the constructor of a value event; for a text event, set once, by the thread whose
  // compare-exchange from null won. Deleted with the event.
  mutable std::atomic<Extras*> extras_{nullptr};
  std::uint32_t epoch_;
};

using EventPtr = std::shared_ptr<const Event>;

/// What a subscription's callback receives.
struct Delivery {
  enum class Kind {
    /// A change: replayed from history or live. `event` is set.
    event,
    /// The topic's current state, sent where the subscriber's history no longer reaches (or it
    /// gave no `since_seq`). `event` is set; events before it were not delivered.
    snapshot,
    /// Events were dropped because the subscriber fell behind (OverflowPolicy::drop_oldest).
    /// `dropped` counts them; resubscribe with `since_seq` to recover them from history.
    gap,
    /// The subscription ended by itself (`reason`, e.g. errc::slow_consumer). The last delivery.
    ended,
  };
  Kind kind = Kind::event;
  EventPtr event;
  std::uint64_t dropped = 0;
  Error reason;
};

/// What a subscription does when its queue is full.
enum class OverflowPolicy {
  /// Drop the oldest queued event and deliver a gap marker before the rest.
  drop_oldest,
  /// End the subscription with errc::slow_consumer.
  end_subscription,
};

struct SubscribeOptions {
  /// Resume point. nullopt: deliver the topic's last event as a snapshot (if it has one), then
  /// live events. N: replay every event with seq > N from history, then live events; where
  /// history no longer reaches back to N+1, the last event as a snapshot instead.
  /// Must be nullopt for a wildcard pattern (wildcards are live only).
  std::optional<std::uint64_t> since_seq;
  /// The epoch since_seq was seen in (Event::epoch). When it is not the topic's current epoch
  /// the numbering has restarted since: since_seq means nothing and the subscriber gets a
  /// snapshot instead. nullopt: since_seq is taken to be of the current epoch.
  std::optional<std::uint32_t> since_epoch;
  /// The topic's current state from where it is kept for good (the gateway reads a booking from
  /// the store), for a topic this bus has nothing of (no event published since the bus started or
  /// forgot the topic, e.g. after a restart). Called under the topic's lock, where a snapshot
  /// would be delivered, and only then; its value (when not null) is delivered as a snapshot with
  /// seq = the topic's current seq (0 when nothing was published) and the topic's epoch. Must be
  /// quick and must not publish.
  std::function<std::shared_ptr<const boost::json::value>()> snapshot_source;
  /// With since_seq nullopt: whether to deliver the last event as a snapshot first.
  bool snapshot = true;
  /// Where the callback runs (nullptr: the bus's own delivery threads). Callbacks of one
  /// subscription never run concurrently, whatever the executor.
  ExecutorPtr executor;
  /// Live events queued and not yet delivered, at most (replayed events do not count).
  std::size_t max_queue = 4096;
  OverflowPolicy overflow = OverflowPolicy::drop_oldest;
};

using DeliveryCallback = std::function<void(const Delivery&)>;

namespace detail {
struct TrustedJson;
/// The part of a subscription its handle talks to; implemented by each bus.
class PUSHBOOK_EXPORT SubscriptionState {
 public:
  virtual ~SubscriptionState();
  virtual void cancel() noexcept = 0;
  virtual bool active() const noexcept = 0;
};
}  // namespace detail

/// A live subscription. Destroying or cancelling it unsubscribes. After cancel() returns no new
/// callback starts, and a callback running on another thread has finished (unless cancel() is
/// called from inside the callback itself, which is allowed). Move-only.
class PUSHBOOK_EXPORT Subscription {
 public:
  Subscription() = default;
  explicit Subscription(std::shared_ptr<detail::SubscriptionState> state) : state_(std::move(state)) {}
  Subscription(Subscription&&) noexcept = default;
  Subscription& operator=(Subscription&& other) noexcept {
    if (this != &other) {
      cancel();
      state_ = std::move(other.state_);
    }
    return *this;
  }
  ~Subscription() { cancel(); }

  void cancel() noexcept {
    if (state_) state_->cancel();
  }
  /// False once cancelled or ended by the bus.
  bool active() const noexcept { return state_ && state_->active(); }

 private:
  std::shared_ptr<detail::SubscriptionState> state_;
};

/// Options of one publish.
struct PublishOptions {
  /// nullopt: the event gets the topic's next sequence number (the bus numbers it).
  /// N: the publisher numbers its events itself (the engine gives booking/<id> the booking's
  /// version), which makes publishing idempotent: when the topic's current seq (in its current
  /// epoch) is already N or more, the event is dropped, nothing is delivered and publish() fails
  /// with errc::already_exists; otherwise the event gets seq N and the topic's counter becomes N.
  /// Numbers may be skipped (a subscriber then sees seq jump, as after a lost event): the
  /// publisher that numbers a topic's events is responsible for their continuity, and should
  /// number every event of that topic (an unnumbered publish takes counter + 1, which a later
  /// numbered one may then collide with). The bus remembers a topic's seq only while it keeps the
  /// topic (LocalBusOptions::topic_idle_ttl, max_topics; RedisBusOptions::topic_idle_ttl): a
  /// topic forgotten and published again starts a new epoch and accepts any N.
  /// N must be 1..2^53 (Redis compares it as a Lua number): errc::bad_request otherwise.
  std::optional<std::uint64_t> seq;
};

/// The largest seq a publisher may give (PublishOptions::seq): 2^53.
inline constexpr std::uint64_t max_publish_seq = std::uint64_t{1} << 53;

/// Publish/subscribe on `/`-separated topics ("booking/<id>", "user/<id>", "resource/<id>").
/// Thread-safe. Publishing never blocks on subscribers.
class PUSHBOOK_EXPORT EventBus {
 public:
  virtual ~EventBus();

  /// Publishes `data` to `topic` with a sequence number (the topic's next one, or the one
  /// `options.seq` gives, see PublishOptions) and a timestamp. The same `data` may be published
  /// to several topics without being copied.
  /// Errors: errc::invalid_topic, errc::bad_request (null data, seq 0 or beyond max_publish_seq),
  /// errc::already_exists (options.seq not above the topic's current seq: dropped, not
  /// delivered), errc::shutting_down.
  virtual result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                                   const PublishOptions& options) = 0;

  /// Publishes with the topic's next sequence number (PublishOptions{}).
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data) {
    return publish(topic, std::move(data), PublishOptions{});
  }

  /// Convenience: publishes a JSON value it takes ownership of.
  result<EventPtr> publish(std::string_view topic, boost::json::value data,
                           const PublishOptions& options = {}) {
    return publish(topic, std::make_shared<const boost::json::value>(std::move(data)), options);
  }

  /// Called with the outcome of publish_async().
  using PublishCallback = std::function<void(result<EventPtr>)>;

  /// Publishes like publish() without waiting for the outcome: `done` (may be empty) is called
  /// with it, on the caller's thread or the bus's own. Events one thread publishes this way reach
  /// the bus, and its subscribers, in the order of the calls; a bus that publishes over the
  /// network (RedisBus) sends them pipelined instead of one round trip each. The default calls
  /// publish() and then `done` before returning.
  virtual void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                             const PublishOptions& options, PublishCallback done);
  /// publish_async() with the topic's next sequence number (PublishOptions{}).
  void publish_async(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                     PublishCallback done) {
    publish_async(topic, std::move(data), PublishOptions{}, std::move(done));
  }

  /// Publishes a payload given as its JSON text, which the event keeps and sends as it is: no
  /// boost::json::value is made for it unless a subscriber asks for Event::data(). For publishers
  /// that have the text already (a service relaying JSON, BookingEngine writing its events'
  /// payloads): the text takes about a third of the memory of the parsed value for as long as
  /// the bus keeps the event, and serializing it for each wire form is saved.
  /// Errors: those of publish(), and errc::bad_request when `json_text` is null or not exactly
  /// one JSON value (whitespace around it is kept as it is). The default parses the text and calls
  /// publish() with the value; LocalBus and RedisBus keep the text.
  virtual result<EventPtr> publish_json(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                        const PublishOptions& options);
  /// publish_json() without waiting for the outcome, as publish_async() (events one thread
  /// publishes with either reach the bus in the order of the calls). The default checks the text
  /// and calls publish_async() with the parsed value.
  virtual void publish_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done);

  /// Subscribes `callback` to an exact topic or a trailing wildcard ("booking/*" matches every
  /// topic below "booking/"; "*" matches all). See SubscribeOptions for replay and bounds.
  /// Errors: errc::invalid_topic, errc::bad_request (since_seq with a wildcard).
  virtual result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                         SubscribeOptions options = {}) = 0;

  /// Called with the outcome of subscribe_async().
  using SubscribeCallback = std::function<void(result<Subscription>)>;

  /// Subscribes like subscribe() without waiting: `done` (required) is called exactly once with
  /// the subscription or the error subscribe() would have returned, on the caller's thread
  /// (before subscribe_async returns) or on the bus's own thread. Never blocks, so a bus that
  /// subscribes over the network (RedisBus) needs no thread per subscription in progress.
  ///
  /// Deliveries may start before `done` runs: the subscription's first deliveries (its replay
  /// or snapshot) are handed to its executor before `done` is called, so with inline_executor()
  /// they have been delivered when `done` runs (as they have when subscribe() returns), and live
  /// events may follow on the bus's thread meanwhile. When `done` gets an error, the callback
  /// will not run any more (with RedisBus it may have run already in one case: the subscriber
  /// connection was lost while the first history read was applied, and the read made again
  /// failed). Until `done` runs the caller has no handle: dropping the Subscription `done`
  /// receives (or cancelling it there) unsubscribes.
  ///
  /// The default calls subscribe() and then `done` before returning, so it blocks as long as
  /// subscribe() does. The gateway subscribes with subscribe_async from its I/O threads: a bus
  /// whose subscribe() waits for the network must override it.
  virtual void subscribe_async(std::string_view pattern, DeliveryCallback callback, SubscribeOptions options,
                               SubscribeCallback done);

  /// The topic's last event, or nullptr when it has none.
  virtual EventPtr last(std::string_view topic) const = 0;

  /// The events of `topic` with seq > since_seq still in history, oldest first.
  virtual std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq = 0) const = 0;

  /// history() where this bus answers it from this process's memory without waiting (LocalBus);
  /// nullopt where it would have to ask elsewhere (RedisBus: a round trip to Redis). For threads
  /// that must not wait, such as the gateway's I/O threads. The default is nullopt.
  virtual std::optional<std::vector<EventPtr>> history_if_local(std::string_view topic,
                                                                std::uint64_t since_seq = 0) const;

  /// Whether the bus can publish and subscribe now, as far as it knows (RedisBus: both its
  /// connections to Redis are up). For health checks: the gateway's /healthz says 503 while it is
  /// false. The default (LocalBus) is true.
  virtual bool available() const noexcept;

 private:
  // publish_json_async of text this library wrote itself (BookingEngine's payloads, valid by
  // construction: fuzz_booking_json compares it with boost::json::serialize's): LocalBus and
  // RedisBus do not check it again. Reached only through detail::TrustedJson. The default calls
  // publish_json_async, so a bus of the host's checks as for anyone.
  virtual void publish_trusted_json_async(std::string_view topic,
                                          std::shared_ptr<const std::string> json_text,
                                          const PublishOptions& options, PublishCallback done);
  friend struct detail::TrustedJson;
};

using EventBusPtr = std::shared_ptr<EventBus>;

/// Whether `topic` is a valid topic: 1..256 characters, non-empty segments separated by '/',
/// made of letters, digits and "-_.:@", no '*'.
PUSHBOOK_EXPORT bool is_valid_topic(std::string_view topic) noexcept;

struct LocalBusOptions {
  /// History kept per topic: at most this many events...
  std::size_t history_limit = 256;
  /// ...and none older than this.
  std::chrono::milliseconds history_max_age = std::chrono::minutes(10);
  /// A topic with no subscriber and no publish for this long is forgotten (with its last value
  /// and sequence counter), so that one-off topics such as booking/<id> do not grow memory.
  std::chrono::milliseconds topic_idle_ttl = std::chrono::hours(1);
  /// At most this many topics are kept: beyond, the least recently active topics without a
  /// subscriber are forgotten before their ttl (a bound on memory at high booking rates).
  std::size_t max_topics = 100'000;
  /// Threads of the default delivery executor (used by subscriptions that name none).
  std::size_t delivery_threads = 1;
};

/// Counters of a LocalBus.
struct LocalBusStats {
  std::uint64_t published = 0;
  std::uint64_t delivered = 0;
  std::uint64_t dropped = 0;
  std::uint64_t slow_consumer_ends = 0;
  std::uint64_t topics = 0;
  std::uint64_t subscriptions = 0;
};

/// An epoch as it goes on the wire: 8 lower-case hex digits.
PUSHBOOK_EXPORT std::string format_epoch(std::uint32_t epoch);
/// The inverse of format_epoch (1 to 8 hex digits); nullopt for anything else.
PUSHBOOK_EXPORT std::optional<std::uint32_t> parse_epoch(std::string_view text) noexcept;

/// The in-process EventBus.
class PUSHBOOK_EXPORT LocalBus final : public EventBus {
 public:
  explicit LocalBus(LocalBusOptions options = {});
  /// Ends every subscription (no more callbacks start) and waits for running callbacks.
  ~LocalBus() override;
  LocalBus(const LocalBus&) = delete;
  LocalBus& operator=(const LocalBus&) = delete;

  using EventBus::publish;
  /// PublishOptions::seq is compared and set under the topic's lock, so of two concurrent
  /// publishes with the same seq exactly one is delivered.
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override;
  /// The event keeps the text (checked first: errc::bad_request when it is not one JSON value).
  result<EventPtr> publish_json(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                const PublishOptions& options) override;
  void publish_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                          const PublishOptions& options, PublishCallback done) override;
  result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                 SubscribeOptions options = {}) override;
  EventPtr last(std::string_view topic) const override;
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq = 0) const override;
  /// history(): LocalBus always answers from memory.
  std::optional<std::vector<EventPtr>> history_if_local(std::string_view topic,
                                                        std::uint64_t since_seq = 0) const override;

  LocalBusStats stats() const;

 private:
  void publish_trusted_json_async(std::string_view topic, std::shared_ptr<const std::string> json_text,
                                  const PublishOptions& options, PublishCallback done) override;
  template <class Payload>
  result<EventPtr> publish_event(std::string_view topic, Payload data, const PublishOptions& options);

  struct impl;
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook
