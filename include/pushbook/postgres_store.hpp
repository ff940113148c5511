// pushbook/postgres_store.hpp: a BookingStore in a PostgreSQL database that several engine
// processes can share. The database holds each resource's reserved and confirmed units and
// enforces capacity in the transaction that stores a booking's version, so no two processes can
// together promise more than a resource has. One writer thread groups concurrent commits into
// one transaction; reads use a small pool of connections of their own.
#pragma once

#include <pushbook/booking_store.hpp>
#include <pushbook/error.hpp>
#include <pushbook/export.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace pushbook {

/// Options of PostgresStore::open.
struct PostgresOptions {
  /// Connections for load() and recover(); more concurrent readers wait for one. The writer has
  /// a connection of its own besides these.
  std::size_t pool_size = 4;
  /// Longest a statement may run. The server enforces it (statement_timeout, lock waits
  /// included) and the client too (the statement's time plus one second, for a server that
  /// stopped answering): a commit never waits longer for an unresponsive database.
  std::chrono::milliseconds statement_timeout{5000};
  /// Longest a connection attempt may take (libpq connect_timeout, rounded up to seconds; a
  /// conninfo that sets connect_timeout itself wins).
  std::chrono::milliseconds connect_timeout{2000};
  /// After a failed connection attempt, commits and reads fail at once (errc::store_failed, the
  /// attempt's message) for this long before the next attempt: while the database is down, the
  /// store answers fast instead of trying to connect for every request.
  std::chrono::milliseconds reconnect_interval{200};
  /// Most changes grouped into one transaction.
  std::size_t max_group = 1024;
  /// How long a claim on a processing booking lasts without renewal. The store renews its
  /// claims every lease/3 while it lives; once a process dies, its undecided bookings are taken
  /// over by another process's store within the lease plus lease/5 (at most 500 ms). At least
  /// 100 ms. Longer leases ride out longer stalls (a process paused past its lease loses its
  /// bookings to another, and its decisions are then refused); shorter ones take over sooner.
  std::chrono::milliseconds lease{10000};
  /// How often the store looks for what other processes left behind: processing bookings whose
  /// claim ran out, versions left in the outbox longer than the lease (their process died).
  /// Zero: lease/5, at most 500 ms. A store that closes (its process shutting down) hands over
  /// at once: the claims it still holds lapse, its outbox rows become stale, and NOTIFY
  /// pushbook_handover wakes the other stores (each LISTENs), which take both without waiting
  /// for the lease or this poll; the poll is the fallback for a process that died.
  std::chrono::milliseconds poll_interval{0};
  /// This store's name in the claims (pushbook_bookings.claimed_by). Empty: host:pid:random,
  /// different for every store object. Two live stores must never share one.
  std::string node_id;
};

/// A durable BookingStore in a PostgreSQL database, shared by any number of processes.
///
/// Capacity: the table pushbook_resources keeps `reserved` and `confirmed` beside `capacity`.
/// Storing a booking's version applies the change in units its status change implies (held:
/// reserved, confirmed: confirmed, anything else: none; the previous status is the stored one)
/// in the same transaction, with a conditional update that only takes units that are free. A
/// version that would take more units than are free fails with errc::sold_out and a message
/// that names the resource; nothing of it is stored. Resource rows are locked in id order
/// (a group's rows all at once, before anything else), so two transactions never deadlock on
/// them.
///
/// Idempotency: (user, idempotency key) is unique in the database. A booking's first version
/// whose key another booking already has fails with errc::idempotency_conflict, whichever
/// process stored the other.
///
/// Writes: commit_async() serialises the change on the calling thread and queues it; one writer
/// thread takes everything queued (up to max_group) into one transaction and hands the group to a
/// completion thread, which runs the callbacks in commit order, one at a time. A version refused
/// for capacity or its key fails alone; the rest of its group is stored. When the transaction
/// fails (the database is unreachable, a statement timed out), every change of the group fails
/// with errc::store_failed and the server's message, and nothing of the group is stored. A
/// connection that broke is replaced on the next use: the store reconnects by itself.
/// commit() and put_resource() queue the same way and wait; from a commit callback they fail at
/// once with errc::store_failed.
///
/// Reads: load() and recover() take a connection of the pool; they run on the caller's thread
/// and wait at most the statement timeout.
///
/// Schema: created by open() when missing and upgraded when older (versioned in
/// pushbook_schema_version, under an advisory lock, so processes starting together upgrade once);
/// a database with a newer version than this build is refused. docs/architecture.md lists the
/// tables and the transaction each operation runs.
class PUSHBOOK_EXPORT PostgresStore final : public BookingStore {
 public:
  /// Connects to `conninfo` (libpq "host=... dbname=..." or a postgresql:// URI), creates or
  /// upgrades the schema, and starts the writer. Errors: errc::store_failed with a message that
  /// says why (the server cannot be reached, authentication failed, the schema is newer than
  /// this build); errc::bad_request when `conninfo` cannot be parsed.
  static result<std::shared_ptr<PostgresStore>> open(const std::string& conninfo,
                                                     PostgresOptions options = {});

  /// Stops taking changes, stores those still queued (their callbacks run), stops the writer
  /// thread and closes the connections. Called from a commit callback (the last reference
  /// dropped there), it returns at once and the store's threads finish on their own.
  ~PostgresStore() override;

  PostgresStore(const PostgresStore&) = delete;
  PostgresStore& operator=(const PostgresStore&) = delete;

  result<void> commit(const StateChange& change) override;
  void commit_async(const StateChange& change, CommitCallback done) override;
  result<std::optional<Booking>> load(std::string_view booking_id) const override;
  /// Creates the resource or changes its capacity. Errors: errc::capacity_in_use when the new
  /// capacity is below the units reserved and confirmed in the database (by any process),
  /// errc::store_failed.
  result<void> put_resource(std::string_view resource_id, std::uint32_t capacity) override;
  /// As the BookingStore contract says, except that `reserved` and `confirmed` are the database's
  /// counters (the truth every process shares), not a recount; they are equal to the recount, the
  /// tests check it.
  result<RecoveredState> recover(wall_clock::time_point keys_since) override;
  /// Recorded with the writer's next transaction (with the changes queued then, or alone, without
  /// waiting for the disk when nothing else is queued): the booking leaves the outbox that
  /// recover() reads. A mark lost in a crash only has its version relayed again.
  void published(std::string_view booking_id, std::uint64_t version) override;
  /// On the store's lease thread, every lease/5 (at most 500 ms): processing bookings whose claim
  /// ran out (their process died) are claimed for this node, at most 100 at a time, each with
  /// its attempt counted up, and handed over to decide; versions in the outbox for longer than
  /// the lease (their process died between commit and publish) are handed over to relay, and
  /// their outbox rows stamped again so that no other node relays them for another lease.
  /// Nothing is taken while no callback is set (recover() claims every undecided booking nobody
  /// holds for the engine that starts).
  void on_takeover(std::function<void(Booking, Takeover)> take) override;
  /// Reports, after each transaction that changed resources, their capacity and units as the
  /// database holds them (every process's bookings), with the row's version.
  bool on_resource_counts(std::function<void(std::vector<ResourceState>)> report) override;
  /// Reads the key's booking (its first version stored it, from any process).
  result<std::optional<StoredKey>> find_key(std::string_view user, std::string_view key) const override;
  /// This store's node id in the claims (PostgresOptions::node_id or the generated one).
  const std::string& node_id() const noexcept;
  /// Bookings handed over (to decide or to relay) so far.
  std::uint64_t taken_over() const noexcept;

  /// Whether the last write transaction or connection attempt succeeded (false while the
  /// database is unreachable; for health checks).
  bool available() const noexcept override;
  /// Write transactions run so far, committed or rolled back (with N concurrent commits it is
  /// well below N when grouping works).
  std::uint64_t transactions() const noexcept;
  /// Changes and resource updates queued for the writer and not yet taken into a transaction.
  std::size_t queued() const;
  /// The schema version this build creates and reads.
  static int schema_version() noexcept;

 private:
  struct impl;
  explicit PostgresStore(std::shared_ptr<impl> state);
  // Shared with the writer and completion threads, which keep it alive until the queue is done.
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook
