// pushbook/sqlite_store.hpp: a BookingStore in an SQLite database file, which survives a crash of
// the process (and, with SqliteSync::full, a power loss). One writer thread groups concurrent
// commits into one transaction; reads use their own connections and never wait for the writer.
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

/// How durable a commit is once its callback says it succeeded.
enum class SqliteSync {
  /// WAL with synchronous=NORMAL: survives a crash of the process, not necessarily a power loss
  /// (the last commits before it may be lost, the database stays consistent).
  normal,
  /// WAL with synchronous=FULL: one fsync per group commit; survives a power loss.
  full,
};

/// Options of SqliteStore::open.
struct SqliteOptions {
  /// normal: WAL + synchronous=NORMAL, survives a process crash (default). full: WAL +
  /// synchronous=FULL, an fsync per group commit, survives power loss.
  SqliteSync sync = SqliteSync::normal;
  /// How long a write or read waits for a lock another process holds before it fails with
  /// errc::store_failed ("database is locked").
  std::chrono::milliseconds busy_timeout{5000};
  /// Most changes grouped into one transaction.
  std::size_t max_group = 1024;
  /// Read-only connections for load() and recover(); more concurrent readers wait for one.
  std::size_t read_connections = 4;
};

/// A durable BookingStore in one SQLite database file (plus its -wal and -shm files while open).
///
/// Writes: commit_async() serialises the change on the calling thread and queues it; one writer
/// thread takes everything queued (up to SqliteOptions::max_group) into one transaction and hands
/// the group to a completion thread, which runs its callbacks in commit order, one at a time,
/// while the writer goes on with the next transaction. When a
/// transaction fails, every change of its group fails with errc::store_failed and SQLite's
/// message, and nothing of the group is stored; later groups are tried afresh. commit() and
/// put_resource() queue the same way and wait, so concurrent synchronous callers share
/// transactions too. They must not be called from a commit callback (they would wait for the
/// thread they run on): there they fail with errc::store_failed at once.
///
/// The queue has no bound of its own: the engine commits at most one change per booking at a
/// time and bounds the bookings it has in flight, which bounds this queue.
///
/// Reads: load() and recover() use a small pool of read-only connections; with WAL they read the
/// last committed state and never wait for the writer.
///
/// Outbox: every booking version is stored together with a row (booking id, version) in an
/// `outbox` table, in the same transaction; published() deletes it later, lazily. recover()
/// reports the bookings still in the outbox (RecoveredState::unpublished). Schema version 2; a
/// version-1 file is upgraded when opened (its bookings count as published: the engine that
/// wrote them published right after each commit).
class PUSHBOOK_EXPORT SqliteStore final : public BookingStore {
 public:
  /// Opens (creating if missing) the database at `path` (a file name, never a URI). Errors:
  /// errc::store_failed with a message that says why: the file is not a database at all, is an
  /// SQLite database that is not pushbook's, has a newer schema version than this build knows,
  /// cannot be opened or created (missing directory, a directory, no permission), or is locked by
  /// another process for longer than `busy_timeout`.
  static result<std::shared_ptr<SqliteStore>> open(const std::string& path, SqliteOptions options = {});

  /// Stops taking changes, stores those still queued (their callbacks run), stops the writer
  /// thread and closes the database. Called from a commit callback (the last reference dropped
  /// there), it returns at once and the store's threads finish the queue and close on their own.
  ~SqliteStore() override;

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;

  result<void> commit(const StateChange& change) override;
  void commit_async(const StateChange& change, CommitCallback done) override;
  result<std::optional<Booking>> load(std::string_view booking_id) const override;
  result<void> put_resource(std::string_view resource_id, std::uint32_t capacity) override;
  result<RecoveredState> recover(wall_clock::time_point keys_since) override;
  /// Recorded lazily: the outbox rows up to `version` are deleted inside the next group-commit
  /// transaction (or when the store closes), never with a transaction (and fsync) of their own.
  void published(std::string_view booking_id, std::uint64_t version) override;

  /// The database file as given to open().
  const std::string& path() const noexcept;
  SqliteSync sync() const noexcept;
  /// Write transactions run so far, committed or rolled back (for statistics and tests: with N
  /// concurrent commits it is well below N when grouping works).
  std::uint64_t transactions() const noexcept;
  /// Changes and resource updates queued for the writer and not yet taken into a transaction.
  std::size_t queued() const;

 private:
  struct impl;
  explicit SqliteStore(std::shared_ptr<impl> state);
  // Shared with the writer and completion threads, which keep it alive until the queue is done.
  std::shared_ptr<impl> impl_;
};

}  // namespace pushbook
