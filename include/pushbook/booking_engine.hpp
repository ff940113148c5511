// pushbook/booking_engine.hpp: validates booking requests and ACKs them at once, decides them on
// a worker pool, never overbooks, honours idempotency keys and publishes every state change.
#pragma once

#include <pushbook/booking.hpp>
#include <pushbook/booking_store.hpp>
#include <pushbook/error.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/export.hpp>
#include <pushbook/metrics.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace pushbook {

namespace detail {
struct engine_core;
}

/// The host's answer for one booking.
struct Decision {
  bool approve = true;
  /// Why it was declined; becomes the booking's reason_message.
  std::string message;
  /// The business step failed (rather than said no): rejected with RejectReason::handler_error.
  bool failed = false;

  static Decision approved() { return {true, {}, false}; }
  static Decision declined(std::string why) { return {false, std::move(why), false}; }
  static Decision error(std::string what) { return {false, std::move(what), true}; }
};

/// Delivers a handler's decision, once. Copyable; any copy may be called from any thread, now
/// or later. Calls after the first, or after the handler timeout fired, are ignored.
class PUSHBOOK_EXPORT Completion {
 public:
  struct state;
  explicit Completion(std::shared_ptr<state> s) : state_(std::move(s)) {}
  /// Returns true when this call decided the booking. An answer that comes after the handler
  /// timeout (counted from the handler's call) does not count: the booking is rejected with
  /// handler_timeout if nothing decided it yet.
  bool operator()(Decision decision) const;

 private:
  std::shared_ptr<state> state_;
};

/// The business step (payment, fraud check, ...). Runs on an engine worker with the capacity
/// already reserved. Answer by calling `done`, before returning or later from any thread.
/// An exception thrown by the handler rejects the booking with RejectReason::handler_error.
using BookingHandler = std::function<void(const Booking& booking, Completion done)>;

/// What an engine starting over an existing store does with bookings it finds still
/// `processing` (ACKed before a crash, never decided).
enum class RecoveryPolicy {
  /// Decide them again, in their original order (the handler may run a second time for a
  /// booking whose first run was cut off by the crash).
  requeue,
  /// Reject them with RejectReason::recovery (so that no handler ever runs twice for a booking);
  /// bookings taken over from another process (PostgresStore) too.
  reject,
};

struct EngineOptions {
  /// Worker threads that decide bookings.
  std::size_t workers = 2;
  /// Bookings accepted but not yet picked by a worker, at most; beyond, submit() fails with
  /// errc::overloaded.
  std::size_t max_queue = 65536;
  /// Optional business step; without one every booking that fits is approved.
  BookingHandler handler;
  /// Without a handler, a booking whose store commit completes within submit (MemoryStore) is
  /// decided on the submitting thread, right after its ACK, instead of on a worker: no thread
  /// hand-off and no wake-up per booking. Arrival order is kept: the booking takes its place in
  /// the work queue when it is stored, and the submitting thread then decides the queue's front
  /// as a worker would (its own booking, behind any that came earlier). A store that commits on
  /// its own thread (SQLite, PostgreSQL) still hands the booking to the workers. Off: every
  /// booking goes to a worker.
  bool decide_on_caller = true;
  /// How long the handler may take before the booking is rejected with handler_timeout.
  std::chrono::milliseconds handler_timeout = std::chrono::seconds(10);
  /// How long idempotency keys are remembered...
  std::chrono::milliseconds idempotency_window = std::chrono::hours(24);
  /// ...and how many at most (the oldest are forgotten first).
  std::size_t max_idempotency_keys = 1'000'000;
  /// Lines per request, at most.
  std::size_t max_lines = 64;
  /// Longest hold a request may ask for (bad_request beyond). A hold keeps units from everyone
  /// else: set what the business allows (a checkout, a few minutes), not more.
  std::chrono::milliseconds max_hold = std::chrono::minutes(15);
  /// Largest `metadata` a request may carry, counted as serialized JSON (bad_request beyond).
  /// Metadata is stored with the booking and sent in each of its events.
  std::size_t max_metadata_bytes = 4096;
  /// Per-user quotas, each 0 for none. Bookings of one user accepted and not decided yet
  /// (errc::quota_exceeded beyond): bounds what one user can make the engine keep...
  std::size_t max_in_flight_per_user = 1000;
  /// ...and units one user may hold at once: units of its held bookings plus those of its
  /// bookings being decided that asked for a hold (errc::quota_exceeded beyond). Off by default
  /// (holds are bounded by capacity and max_hold); a host selling scarce units to the public sets
  /// it (pushbook-server: 100).
  std::uint64_t max_held_units_per_user = 0;
  /// Where state changes are written before they touch memory or are published (default: a
  /// MemoryStore). Over a store that already holds bookings the engine recovers at construction
  /// (see docs/architecture.md, "Durability and recovery").
  std::shared_ptr<BookingStore> store;
  /// What recovery does with bookings still processing.
  RecoveryPolicy recovery = RecoveryPolicy::requeue;
  /// This process's node id, part of every booking id (default: random). Give each engine of a
  /// deployment its own to make ids unique by construction rather than by probability.
  std::optional<std::uint32_t> node_id;
  /// Events not yet taken by the bus are kept, in order per topic: in flight (the engine
  /// publishes with EventBus::publish_async and never waits for the bus), waiting behind an
  /// earlier event of their topic, or refused (errc::bus_unavailable: Redis away) and published
  /// again with a backoff until the bus takes them; at most this many. Beyond, new events are
  /// dropped and counted (EngineStats::publish_dropped); a durable store still has their booking
  /// versions in its outbox, relayed at the next start. A resource's events only carry its
  /// latest state: they are never dropped, and a resource has at most two waiting (one at the
  /// bus, the latest state behind it).
  std::size_t max_publish_backlog = 100'000;
};

/// Counters of an engine, read with BookingEngine::stats().
struct EngineStats {
  std::uint64_t accepted = 0;
  std::uint64_t confirmed = 0;
  std::uint64_t rejected = 0;
  std::uint64_t held = 0;
  std::uint64_t cancelled = 0;
  std::uint64_t released = 0;
  std::uint64_t expired = 0;
  std::uint64_t idempotent_replays = 0;
  std::uint64_t invalid = 0;
  std::uint64_t overloaded = 0;
  /// Commits the store refused (each retried or reported, never ignored).
  std::uint64_t store_errors = 0;
  /// Bookings found processing at start and decided again (or rejected) by recovery.
  std::uint64_t recovered = 0;
  /// Accepted and not decided yet.
  std::uint64_t in_flight = 0;
  /// Accepted and waiting for a worker.
  std::uint64_t queue_depth = 0;
  /// Workers parked now (waiting for work, not spinning).
  std::uint64_t parked_workers = 0;
  /// Requests refused by a per-user quota (EngineOptions::max_in_flight_per_user,
  /// max_held_units_per_user).
  std::uint64_t quota_exceeded = 0;
  /// Publishes the bus refused (errc::bus_unavailable and the like), first tries and retries.
  std::uint64_t publish_failures = 0;
  /// Events published after the bus had refused them or an earlier event of their topic.
  std::uint64_t publish_retries = 0;
  /// Events not yet taken by the bus: in flight, waiting behind an earlier event of their topic,
  /// or to be published again (EngineOptions::max_publish_backlog).
  std::uint64_t publish_backlog = 0;
  /// Events given up: the backlog was full, or the bus refused them for good (bad_request,
  /// invalid_topic). A durable store relays the booking versions among them at the next start.
  std::uint64_t publish_dropped = 0;
  /// Booking versions found unpublished in the store at start, or handed over by a store shared
  /// with a process that died before publishing them (BookingStore::Takeover::relay), and
  /// published again (relayed).
  std::uint64_t relayed = 0;
  /// Bookings another process ACKed and stopped deciding, taken over by this engine
  /// (BookingStore::on_takeover: PostgresStore, after the other's lease ran out).
  std::uint64_t taken_over = 0;
  /// Decisions the store refused because another process had taken the booking over meanwhile
  /// (this process stalled past its lease): that process decides it; nothing of this decision
  /// was stored or published.
  std::uint64_t claims_lost = 0;
  /// From submit() called to submit() returning the ACK.
  LatencySummary ack_latency;
  /// From submit() called to the decision being handed to the bus (publish_async).
  LatencySummary decision_latency;
};

/// The booking engine. Thread-safe.
///
/// Bookings publish to "booking/<id>" and "user/<user>" (the booking's JSON, see to_json), and
/// every change of a resource's availability to "resource/<id>". On "booking/<id>" an event's
/// seq is the booking's version (PublishOptions::seq): a version published twice (relayed after
/// a crash, retried after a lost reply) is delivered once. The engine hands events to the bus with
/// EventBus::publish_async and never waits for it; each topic's events reach the bus in the order
/// the engine made them. Events the bus refuses are published again later
/// (EngineOptions::max_publish_backlog); versions a durable store still holds as unpublished at
/// start are relayed (see docs/architecture.md, "Published means relayed"). A call that returns
/// after a change (submit's ACK, cancel(), ...) does not wait for its events: a subscriber may
/// see them a little after.
class PUSHBOOK_EXPORT BookingEngine {
 public:
  /// Starts the workers. Over a store that holds state (a restart) it first recovers: resources
  /// with their capacity and counts, holds (expiry re-armed), idempotency keys within the
  /// window, and bookings still processing (EngineOptions::recovery).
  /// Throws pushbook::Exception (errc::store_failed) when the store cannot be read.
  explicit BookingEngine(EventBusPtr bus, EngineOptions options = {});
  /// Calls shutdown().
  ~BookingEngine();
  BookingEngine(const BookingEngine&) = delete;
  BookingEngine& operator=(const BookingEngine&) = delete;

  /// Adds a resource, stored first. A resource recovered from the store is reconciled instead:
  /// the same capacity changes nothing, another one follows set_capacity()'s rules (the first
  /// add_resource() of it in this process only). Errors: bad_request (invalid id), already_exists,
  /// capacity_in_use (reconciling below what is in use), store_failed.
  result<void> add_resource(std::string_view id, std::uint32_t capacity);
  /// Changes a resource's capacity, stored first. Errors: not_found, capacity_in_use (below what
  /// is reserved plus confirmed), store_failed.
  result<void> set_capacity(std::string_view id, std::uint32_t capacity);
  result<ResourceState> resource(std::string_view id) const;
  /// Units free now. Errors: not_found.
  result<std::uint32_t> availability(std::string_view id) const;
  std::vector<ResourceState> resources() const;

  /// Validates `request` and returns the ACK (status processing) at once; the decision follows
  /// on "booking/<id>". Errors, never an ACK: bad_request (also: metadata or hold beyond the
  /// options' limits), not_found (unknown resource; also: a retry of an idempotency key whose
  /// booking the store no longer keeps, see MemoryStoreOptions), exceeds_capacity,
  /// idempotency_conflict, quota_exceeded (the user's per-user quota), overloaded (also: a retry
  /// of an idempotency key whose first submit is still being stored; retry), shutting_down,
  /// store_failed.
  /// The ACK means the processing version is stored (as durable as the store is). Blocks for the
  /// store's commit: a thread that must not block (an I/O thread) uses submit_async().
  result<Ack> submit(BookingRequest request);

  /// Called once with submit()'s result.
  using SubmitCallback = std::function<void(result<Ack>)>;
  /// submit() without waiting for the store: `done` is called exactly once with the ACK or the
  /// error, on the calling thread when the answer is known at once (bad input, MemoryStore) and
  /// otherwise on the store's thread once the commit is durable. `done` must be short and must
  /// not call the engine's blocking methods (post the work elsewhere, as the gateway does). An
  /// exception `done` throws on the calling thread leaves submit_async; the booking it ACKed is
  /// decided all the same.
  void submit_async(BookingRequest request, SubmitCallback done);

  /// The booking as stored now. Errors: not_found, store_failed.
  result<Booking> get(std::string_view booking_id) const;
  /// confirmed -> cancelled, releasing capacity. Errors: not_found, invalid_transition,
  /// store_failed (nothing changed).
  result<Booking> cancel(std::string_view booking_id);
  /// held -> confirmed. Errors: not_found, invalid_transition (naming the state it reached),
  /// store_failed (nothing changed).
  result<Booking> confirm(std::string_view booking_id);
  /// held -> released, releasing capacity. Errors: not_found, invalid_transition, store_failed
  /// (nothing changed).
  result<Booking> release(std::string_view booking_id);

  /// Stops taking bookings (submit() then fails with shutting_down), rejects those still queued
  /// with RejectReason::shutdown, waits for handlers in flight (each at most the handler timeout)
  /// and for their commits, and joins the workers; then waits for the bus to answer every event
  /// handed to it (events waiting behind a refusal are dropped: a durable store relays their
  /// versions at the next start), and the timer thread stops (holds no longer expire in this
  /// process: the next start re-arms them). A decision the store refuses during shutdown stays
  /// processing in the store: the next start decides it (recovery). Idempotent; the destructor
  /// calls it. Must not be called from a handler, a worker thread, or a bus callback.
  void shutdown();

  /// True while a change of the booking has events not yet taken by the bus (handed to it,
  /// waiting behind an earlier event of their topic, or refused and to be retried): the stored
  /// state (get()) is then ahead of what "booking/<id>" has delivered. The gateway gives no
  /// snapshot from the store for such a booking; its events follow.
  bool publishing(std::string_view booking_id) const;

  EngineStats stats() const;
  const EventBusPtr& bus() const noexcept;
  /// Whether the engine's store can take changes now (BookingStore::available), for health checks.
  bool store_available() const noexcept;

 private:
  std::shared_ptr<detail::engine_core> impl_;
};

}  // namespace pushbook
