// pushbook/booking_store.hpp: where the engine writes every booking state change before it
// touches its in-memory counts or publishes anything. The store, not the engine's memory, is the
// source of truth: the engine's resource counts and idempotency map are a cache it rebuilds from
// the store at start (BookingStore::recover). MemoryStore keeps everything in this process and
// is the fastest; SqliteStore (pushbook/sqlite_store.hpp) survives a crash.
#pragma once

#include <pushbook/booking.hpp>
#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string_view>
#include <vector>

namespace pushbook {

/// An event the engine publishes once a change is stored.
struct OutboxEvent {
  std::string topic;
  /// The payload's JSON text (published with EventBus::publish_json).
  std::shared_ptr<const std::string> json;
  /// The seq it is published with (PublishOptions::seq): the booking's version on
  /// "booking/<id>", so that the bus drops a version relayed twice; 0 for the bus's next seq.
  std::uint64_t seq = 0;
};

/// One state change of one booking: the booking as it is after the change, and the events that
/// announce it. The engine publishes `events` only after the store said the change is stored.
/// A durable store keeps, with the version, that it is not yet published (its outbox), until the
/// engine says it is (BookingStore::published); a restart relays what is left (RecoveredState::
/// unpublished). The events themselves are not stored: they are made again from the booking.
struct StateChange {
  const Booking& booking;
  std::vector<OutboxEvent> events;
  /// Set on a booking's first version when it has an idempotency key: what the engine compares
  /// a retry with (same key, same fingerprint: the same request). Stores keep it with the key.
  std::string_view fingerprint;
};

/// An idempotency key as the store remembers it.
struct StoredKey {
  std::string user;
  std::string key;
  std::string fingerprint;
  std::string booking_id;
  wall_clock::time_point created_at;
};

/// What an engine needs to rebuild its state after a restart (BookingStore::recover).
struct RecoveredState {
  /// Every resource with its stored capacity; `reserved` and `confirmed` recomputed from the
  /// bookings (held bookings' lines are reserved, confirmed bookings' lines confirmed; a
  /// processing booking holds nothing: it is decided again). Sorted by id.
  std::vector<ResourceState> resources;
  /// Bookings still `processing`, in the order they were first stored (their ACK order).
  std::vector<Booking> processing;
  /// Bookings `held`, for their expiry.
  std::vector<Booking> held;
  /// Idempotency keys of bookings created at or after the `keys_since` given to recover().
  std::vector<StoredKey> keys;
  /// Bookings whose latest version was stored and never marked published (BookingStore::
  /// published): the process may have died before their events reached the bus. Their latest
  /// version, in the order they were first stored. The engine publishes them again before it
  /// takes bookings. Empty for a store that keeps nothing across restarts.
  std::vector<Booking> unpublished;
};

/// Called when a commit is durable, or failed (errc::store_failed).
using CommitCallback = std::function<void(result<void>)>;

/// Persistence of bookings and resources. Thread-safe. The engine never commits two changes of
/// the same booking concurrently, and waits for one commit's callback before it commits the
/// booking's next version.
class PUSHBOOK_EXPORT BookingStore {
 public:
  virtual ~BookingStore();

  /// Stores `change.booking`, replacing the previous version; returns once it is durable (as
  /// durable as the store is). Errors: errc::store_failed.
  virtual result<void> commit(const StateChange& change) = 0;

  /// Stores `change` and calls `done` once it is durable or failed. `change` need not outlive
  /// the call. Callbacks run in the order the changes were committed (a store with a writer
  /// thread runs them there, one at a time, so they must be short and must not wait for the
  /// store). Concurrent commits may be grouped into one transaction. The default calls commit()
  /// and then `done` on the calling thread.
  virtual void commit_async(const StateChange& change, CommitCallback done);

  /// The booking with this id; nullopt when there is none. Errors: errc::store_failed (the store
  /// could not be read: "unavailable" is never reported as "not found").
  virtual result<std::optional<Booking>> load(std::string_view booking_id) const = 0;

  /// Creates the resource or changes its capacity. Errors: errc::store_failed.
  virtual result<void> put_resource(std::string_view resource_id, std::uint32_t capacity) = 0;

  /// Reads back everything the engine keeps in memory (see RecoveredState). Called once, before
  /// the engine takes bookings. Errors: errc::store_failed.
  virtual result<RecoveredState> recover(wall_clock::time_point keys_since) = 0;

  /// The engine says that every event of `booking_id` up to `version` reached the bus: the
  /// store may forget that they are to be published (RecoveredState::unpublished). Never
  /// blocks and never fails: a store may record it lazily (SqliteStore does, in its next
  /// transaction), so after a crash a version already published may be relayed again, which
  /// the bus drops (PublishOptions::seq). Called from commit callbacks too. The default does
  /// nothing (a store that keeps nothing across restarts has nothing to relay).
  virtual void published(std::string_view booking_id, std::uint64_t version);

  /// What a store shared by several processes hands over (on_takeover).
  enum class Takeover {
    /// A processing booking another process ACKed and stopped deciding (it died, so its claim
    /// ran out), now claimed for this one, with Booking::attempt counted up: decide it.
    decide,
    /// A stored version whose events another process may never have published (it stayed in
    /// the outbox past the lease): relay it (the bus drops it if it has the version).
    relay,
  };

  /// A store that several processes share (PostgresStore) hands this process what other
  /// processes left behind (see Takeover), in the order the bookings were first stored, on a
  /// thread of the store's. The engine sets it once it has recovered and clears it (nullptr)
  /// when it shuts down; clearing waits for a call in progress, and no call comes after it.
  /// `take` must not call on_takeover. The default never calls it (a store one process owns has
  /// nothing to take over).
  virtual void on_takeover(std::function<void(Booking, Takeover)> take);

  /// A store that holds each resource's counts for several processes (PostgresStore) reports
  /// them after each transaction that changed them: the resources as the store holds them
  /// (ResourceState::version counts their changes), on a thread of the store's, in commit order.
  /// The engine then publishes these on resource/<id> (seq = version, so that counts another
  /// process published later are never overwritten by older ones), not its own counts, which
  /// know only this process's bookings. Returns whether the store reports counts; the default
  /// does not (false: the engine's counts are the whole truth). Clearing (nullptr) waits for a
  /// call in progress; no call comes after it. `report` must not call the store.
  virtual bool on_resource_counts(std::function<void(std::vector<ResourceState>)> report);

  /// The booking that holds `user`'s idempotency `key` in the store (its fingerprint and id), or
  /// nullopt. The engine asks when a first version was refused with idempotency_conflict: in a
  /// store several processes share (PostgresStore) another process stored the key first, and the
  /// same request is answered with that booking. The default says nullopt (a store one process
  /// owns never refuses a key its engine does not know). Errors: errc::store_failed.
  virtual result<std::optional<StoredKey>> find_key(std::string_view user, std::string_view key) const;

  /// Whether the store can take changes now, as far as it knows (PostgresStore: its last write
  /// transaction or connection attempt succeeded). For health checks: the gateway's /healthz
  /// says 503 while it is false. The default is true.
  virtual bool available() const noexcept;
};

/// How long a MemoryStore keeps finished bookings (rejected, cancelled, released, expired: no
/// transition leaves them). Live bookings (processing, held, confirmed) are always kept; they are
/// bounded by capacity and the engine's queue and quotas, while finished ones would grow memory
/// with every request (a sold-out resource rejects as fast as clients ask).
struct MemoryStoreOptions {
  /// A finished booking is forgotten this long after it finished...
  std::chrono::milliseconds finished_retention = std::chrono::hours(1);
  /// ...or sooner, oldest first, when more than this many finished bookings are kept.
  std::size_t max_finished = 10'000;
};

/// A thread-safe in-memory BookingStore: fast, and gone with the process. Forgets finished
/// bookings after a while (MemoryStoreOptions): get() of one then says not_found, and a retry of
/// its idempotency key gets not_found too (never a second booking). A store that keeps every
/// booking is durable: SqliteStore.
class PUSHBOOK_EXPORT MemoryStore final : public BookingStore {
 public:
  explicit MemoryStore(MemoryStoreOptions options = {});
  ~MemoryStore() override;
  result<void> commit(const StateChange& change) override;
  result<std::optional<Booking>> load(std::string_view booking_id) const override;
  result<void> put_resource(std::string_view resource_id, std::uint32_t capacity) override;
  result<RecoveredState> recover(wall_clock::time_point keys_since) override;
  /// Number of bookings stored (finished ones until they are forgotten).
  std::size_t size() const;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

/// Opens a store from a URL: "memory:" (MemoryStore), "sqlite:PATH" or
/// "sqlite:PATH?sync=normal|full" (SqliteStore), "postgresql://..." (PostgresStore, the URI as
/// libpq takes it, default PostgresOptions). Errors: errc::bad_request (unknown scheme or
/// option), errc::store_failed (the database cannot be opened; the message says why).
PUSHBOOK_EXPORT result<std::shared_ptr<BookingStore>> open_store(std::string_view url);

}  // namespace pushbook
