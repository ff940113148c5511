#include <pushbook/sqlite_store.hpp>

#include "detail/recovery.hpp"

#include <sqlite3.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <limits>
#include <mutex>
#include <thread>
#include <variant>

namespace pushbook {
namespace {

// PRAGMA application_id of every pushbook database ("PshB"): how open() tells our files from
// other applications' SQLite files.
constexpr std::int32_t pushbook_application_id = 0x50736842;
// PRAGMA user_version this build writes and reads; migrate() upgrades older files to it.
constexpr int current_schema_version = 2;

struct statement_deleter {
  void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};
using statement = std::unique_ptr<sqlite3_stmt, statement_deleter>;
struct database_deleter {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using database = std::unique_ptr<sqlite3, database_deleter>;

// Resets a statement when a use of it ends, however it ends, so that it holds no read snapshot
// or lock between uses and can be bound afresh.
class statement_use {
 public:
  explicit statement_use(sqlite3_stmt* s) noexcept : s_(s) {}
  ~statement_use() {
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
  }
  statement_use(const statement_use&) = delete;
  statement_use& operator=(const statement_use&) = delete;
  sqlite3_stmt* get() const noexcept { return s_; }

 private:
  sqlite3_stmt* s_;
};

std::string_view column_text(sqlite3_stmt* s, int column) {
  const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(s, column));
  if (!text) return {};
  return {text, static_cast<std::size_t>(sqlite3_column_bytes(s, column))};
}

int bind_text(sqlite3_stmt* s, int index, std::string_view text) {
  // SQLITE_STATIC: the strings outlive the statement's use (they belong to the queued change).
  return sqlite3_bind_text64(s, index, text.data(), text.size(), SQLITE_STATIC, SQLITE_UTF8);
}

// Empty optional strings are stored as NULL, so "IS NOT NULL" finds exactly the keys.
int bind_text_or_null(sqlite3_stmt* s, int index, std::string_view text) {
  return text.empty() ? sqlite3_bind_null(s, index) : bind_text(s, index, text);
}

std::int64_t unix_ms(wall_clock::time_point t) {
  // As to_json writes it, so the column and the JSON agree.
  return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}

// The `lines` column: "resource quantity;resource quantity", compact so that recovery counts
// units without parsing JSON. Resource ids are letters, digits and "-_.:@+=~" when the engine
// validated them; '%', ' ' and ';' are percent-escaped anyway so that no id can break the format.
std::string encode_lines(const std::vector<BookingLine>& lines) {
  std::string out;
  for (const auto& l : lines) {
    if (!out.empty()) out += ';';
    for (char c : l.resource) {
      if (c == '%' || c == ' ' || c == ';') {
        constexpr const char* hex = "0123456789ABCDEF";
        const auto u = static_cast<unsigned char>(c);
        out += '%';
        out += hex[u >> 4];
        out += hex[u & 15];
      } else {
        out += c;
      }
    }
    out += ' ';
    out += std::to_string(l.quantity);
  }
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Decodes encode_lines() into `lines`, reusing its strings' storage; false when malformed.
bool decode_lines(std::string_view text, std::vector<BookingLine>& lines) {
  std::size_t count = 0;
  while (!text.empty()) {
    const auto end = std::min(text.find(';'), text.size());
    const auto item = text.substr(0, end);
    text.remove_prefix(end == text.size() ? end : end + 1);
    const auto space = item.rfind(' ');
    if (space == std::string_view::npos || space == 0) return false;
    if (count == lines.size()) lines.emplace_back();
    auto& line = lines[count++];
    const auto resource = item.substr(0, space);
    const auto quantity = item.substr(space + 1);
    auto [ptr, ec] = std::from_chars(quantity.data(), quantity.data() + quantity.size(), line.quantity);
    if (ec != std::errc() || ptr != quantity.data() + quantity.size()) return false;
    if (resource.find('%') == std::string_view::npos) {
      line.resource.assign(resource);
      continue;
    }
    line.resource.clear();
    for (std::size_t i = 0; i < resource.size(); ++i) {
      if (resource[i] != '%') {
        line.resource += resource[i];
        continue;
      }
      if (i + 2 >= resource.size()) return false;
      const int hi = hex_value(resource[i + 1]), lo = hex_value(resource[i + 2]);
      if (hi < 0 || lo < 0) return false;
      line.resource += static_cast<char>(hi * 16 + lo);
      i += 2;
    }
  }
  lines.resize(count);
  return true;
}

// One queued booking version, serialised on the committing thread.
struct booking_row {
  std::string id;
  std::string user;
  std::string status;
  std::string idempotency_key;
  std::string fingerprint;
  std::int64_t created_at_ms = 0;
  std::string lines;
  std::string json;
  std::uint64_t version = 0;
};

struct resource_row {
  std::string id;
  std::uint32_t capacity = 0;
};

struct pending {
  std::variant<booking_row, resource_row> row;
  CommitCallback done;
};

// A booking version whose events reached the bus (BookingStore::published): its outbox row goes
// in the next transaction.
struct published_mark {
  std::string id;
  std::uint64_t version;
};

// Waits for one queued change: how commit() and put_resource() wait for the writer thread.
struct waiter {
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<result<void>> outcome;

  CommitCallback callback(const std::shared_ptr<waiter>& self) {
    return [self](result<void> r) {
      std::lock_guard lock(self->mutex);
      self->outcome = std::move(r);
      self->cv.notify_one();
    };
  }
  result<void> wait() {
    std::unique_lock lock(mutex);
    cv.wait(lock, [&] { return outcome.has_value(); });
    return std::move(*outcome);
  }
};

// Schema version 1. `status` holds the stable names of to_string(BookingStatus), so that a reordered
// enum cannot change what a stored row means. No secondary index: recovery reads every row once
// anyway (the counts need every confirmed booking), and load() goes by the primary key; an index
// would only slow every commit down.
constexpr const char* schema_v1 = R"sql(
CREATE TABLE bookings (
  id          TEXT PRIMARY KEY NOT NULL,
  user        TEXT NOT NULL,
  status      TEXT NOT NULL,
  idem_key    TEXT,
  fingerprint TEXT,
  created_at  INTEGER NOT NULL,
  lines       TEXT NOT NULL,
  booking     TEXT NOT NULL
);
CREATE TABLE resources (
  id       TEXT PRIMARY KEY NOT NULL,
  capacity INTEGER NOT NULL
);
)sql";

// First-stored order is the rowid: an upsert keeps the row (and its rowid) of the first
// version. The fingerprint comes with a booking's first version and is kept from then on.
// Schema version 2: the outbox. One row per booking whose latest stored version is not known to
// be published: written in the same transaction as the version (an upsert: a newer version
// replaces an older one, whose state the store no longer has anyway), deleted once the engine
// says the version's events reached the bus. WITHOUT ROWID: it is looked up and deleted by id
// only, and stays small (rows live from a commit to the next transaction).
constexpr const char* schema_v2_outbox = R"sql(
CREATE TABLE outbox (
  booking_id TEXT PRIMARY KEY NOT NULL,
  version    INTEGER NOT NULL
) WITHOUT ROWID;
)sql";

constexpr const char* upsert_outbox_sql =
    "INSERT INTO outbox (booking_id, version) VALUES (?1, ?2) "
    "ON CONFLICT (booking_id) DO UPDATE SET version = excluded.version";

// `version <=`: a mark for version N must not remove the row of a version N+1 stored meanwhile.
constexpr const char* delete_outbox_sql = "DELETE FROM outbox WHERE booking_id = ?1 AND version <= ?2";

constexpr const char* upsert_booking_sql = R"sql(
INSERT INTO bookings (id, user, status, idem_key, fingerprint, created_at, lines, booking)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (id) DO UPDATE SET
  user = excluded.user, status = excluded.status, idem_key = excluded.idem_key,
  fingerprint = coalesce(bookings.fingerprint, excluded.fingerprint),
  created_at = excluded.created_at, lines = excluded.lines, booking = excluded.booking
)sql";

constexpr const char* upsert_resource_sql =
    "INSERT INTO resources (id, capacity) VALUES (?1, ?2) "
    "ON CONFLICT (id) DO UPDATE SET capacity = excluded.capacity";

// Columns of the recovery scan.
enum scan_column : int {
  scan_status,
  scan_lines,
  scan_id,
  scan_booking,
  scan_idem_key,
  scan_fingerprint,
  scan_user,
  scan_created_at
};

thread_local const void* current_writer = nullptr;  // the store whose callbacks run on this thread

}  // namespace

struct SqliteStore::impl {
  // One read-only connection with its own statements; used by one thread at a time.
  struct reader {
    database db;
    statement begin, end, load, resources, scan, unpublished;
  };

  std::string path;
  SqliteOptions options;

  database writer_db;
  statement begin, commit, rollback, upsert_booking, upsert_resource, upsert_outbox, delete_outbox;

  mutable std::mutex queue_mutex;
  std::condition_variable queue_cv;
  std::deque<pending> queue;
  bool stopping = false;  // the store is being destroyed: finish the queue and stop
  bool closed = false;    // the writer thread has stopped: nothing queued is ever taken
  std::thread writer;
  std::atomic<std::uint64_t> transactions{0};

  // Groups written (or failed), their callbacks not run yet. The writer hands each group over
  // and goes on with the next transaction while the completer runs the callbacks: SQL and the
  // callbacks' work (the engine publishes there) overlap instead of adding up on one thread.
  std::mutex done_mutex;
  std::condition_variable done_cv;
  std::deque<std::pair<std::vector<pending>, result<void>>> done_queue;
  bool writer_finished = false;  // done_mutex: no group will be handed over any more
  std::thread completer;

  // Marks of published versions (BookingStore::published), taken into the next transaction.
  // Bounded without a limit of their own: one mark per stored version, and every transaction
  // takes them all. The engine marks from its commit callbacks, on the completer thread: those
  // gather in completer_marks without a lock and move over once per group, so that the thread
  // every completion runs on never waits for the submitters' queue_mutex.
  std::mutex marks_mutex;
  std::vector<published_mark> published_marks;  // marks_mutex
  bool marks_closed = false;                    // marks_mutex: the last marks were written
  std::vector<published_mark> completer_marks;  // the completer thread only

  mutable std::mutex readers_mutex;
  mutable std::condition_variable readers_cv;
  mutable std::vector<std::unique_ptr<reader>> idle_readers;

  impl(std::string p, SqliteOptions o) : path(std::move(p)), options(o) {
    options.max_group = std::max<std::size_t>(options.max_group, 1);
    options.read_connections = std::max<std::size_t>(options.read_connections, 1);
  }

  // ---- errors ----

  std::string where() const { return "SQLite database '" + path + "'"; }

  Error failure(sqlite3* db, int rc, std::string_view doing) const {
    std::string message = where() + ": " + std::string(doing) + ": " + sqlite3_errmsg(db);
    if ((rc & 0xff) == SQLITE_BUSY)
      message += " (another connection holds it longer than busy_timeout, " +
                 std::to_string(options.busy_timeout.count()) + " ms)";
    return Error(errc::store_failed, std::move(message));
  }

  // ---- opening ----

  // The file name as SQLite must see it: this build of SQLite takes "file:" names as URIs, and
  // a path is never meant as one.
  std::string file_name() const { return path.starts_with("file:") ? "./" + path : path; }

  result<database> open_connection(int flags) const {
    sqlite3* raw = nullptr;
    const int rc = sqlite3_open_v2(file_name().c_str(), &raw, flags | SQLITE_OPEN_NOMUTEX, nullptr);
    database db(raw);  // closed on every path, also when opening failed
    if (rc != SQLITE_OK) {
      std::string message =
          "cannot open " + where() + ": " + (db ? sqlite3_errmsg(db.get()) : "out of memory");
      if (db && sqlite3_system_errno(db.get()) != 0)
        message += " (" + std::system_category().message(sqlite3_system_errno(db.get())) + ")";
      return Error(errc::store_failed, std::move(message));
    }
    sqlite3_extended_result_codes(db.get(), 1);
    sqlite3_busy_timeout(db.get(), static_cast<int>(std::clamp<std::int64_t>(
                                       options.busy_timeout.count(), 0, std::numeric_limits<int>::max())));
    return db;
  }

  result<statement> prepare(sqlite3* db, std::string_view sql) const {
    sqlite3_stmt* raw = nullptr;
    const int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()), SQLITE_PREPARE_PERSISTENT,
                                      &raw, nullptr);
    statement s(raw);
    if (rc != SQLITE_OK) return failure(db, rc, "preparing a statement");
    return s;
  }

  result<void> exec(sqlite3* db, const char* sql, std::string_view doing) const {
    const int rc = sqlite3_exec(db, sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) return failure(db, rc, doing);
    return {};
  }

  // A pragma's single integer value.
  result<std::int64_t> pragma_int(sqlite3* db, const char* sql) const {
    sqlite3_stmt* raw = nullptr;
    int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
    statement s(raw);
    if (rc == SQLITE_OK) rc = sqlite3_step(s.get());
    if (rc != SQLITE_ROW) return identify_failure(db, rc);
    return sqlite3_column_int64(s.get(), 0);
  }

  Error identify_failure(sqlite3* db, int rc) const {
    if ((rc & 0xff) == SQLITE_NOTADB)
      return Error(errc::store_failed, where() + " is not a pushbook database: " + sqlite3_errmsg(db));
    return failure(db, rc, "reading its header");
  }

  // The schema version of the file, 0 for a new (empty) database; an error for anything that is
  // not a pushbook database or is newer than this build.
  result<int> schema_version(sqlite3* db) const {
    auto application_id = pragma_int(db, "PRAGMA application_id");
    if (!application_id) return application_id.error();
    auto user_version = pragma_int(db, "PRAGMA user_version");
    if (!user_version) return user_version.error();
    auto objects = pragma_int(db, "SELECT count(*) FROM sqlite_master");
    if (!objects) return objects.error();

    if (*application_id == 0) {
      if (*objects == 0 && *user_version == 0) return 0;
      return Error(errc::store_failed,
                   where() + " is not a pushbook database (an SQLite database of another application)");
    }
    if (*application_id != pushbook_application_id) {
      return Error(errc::store_failed, where() + " is not a pushbook database (its application_id is " +
                                           std::to_string(*application_id) + ")");
    }
    if (*user_version > current_schema_version) {
      return Error(errc::store_failed,
                   where() + ": database schema version " + std::to_string(*user_version) +
                       " is newer than this pushbook (knows " + std::to_string(current_schema_version) + ")");
    }
    if (*user_version < 1)
      return Error(errc::store_failed, where() + " is a pushbook database without a schema version");
    return static_cast<int>(*user_version);
  }

  // Upgrades the schema by one version, from `from` to `from + 1`, inside the caller's
  // transaction. Every future schema change is one more case here; files never go back.
  result<void> migrate_step(sqlite3* db, int from) const {
    switch (from) {
      case 0: return exec(db, schema_v1, "creating the schema");
      // Bookings stored by a version-1 store have no outbox rows: they count as published (that
      // engine published right after each commit, and nothing recorded whether it got there).
      case 1: return exec(db, schema_v2_outbox, "adding the outbox (schema version 2)");
      default: break;
    }
    return Error(errc::store_failed, where() + ": no migration from schema version " + std::to_string(from));
  }

  result<void> migrate(sqlite3* db) const {
    // IMMEDIATE: a second process opening the same new file waits here, then sees our schema.
    if (auto r = exec(db, "BEGIN IMMEDIATE", "starting the schema upgrade"); !r) return r;
    auto version = schema_version(db);  // again: it may have changed before we held the lock
    result<void> outcome;
    if (!version) {
      outcome = version.error();
    } else {
      for (int v = *version; v < current_schema_version && outcome; ++v) outcome = migrate_step(db, v);
      if (outcome && *version < current_schema_version) {
        const std::string stamp = "PRAGMA application_id = " + std::to_string(pushbook_application_id) +
                                  "; PRAGMA user_version = " + std::to_string(current_schema_version);
        outcome = exec(db, stamp.c_str(), "writing the schema version");
      }
    }
    if (outcome) outcome = exec(db, "COMMIT", "committing the schema upgrade");
    if (!outcome && !sqlite3_get_autocommit(db)) sqlite3_exec(db, "ROLLBACK", nullptr, nullptr, nullptr);
    return outcome;
  }

  result<void> open_writer() {
    if (path.empty() || path == ":memory:")
      return Error(errc::store_failed,
                   "SQLite store: '" + path + "' is not a file name (a durable store needs one)");
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
      return Error(errc::store_failed, "cannot open " + where() + ": it is a directory");

    auto db = open_connection(SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    if (!db) return db.error();
    auto version = schema_version(db->get());
    if (!version) return version.error();
    // Only now that the file is known to be ours (or empty) is it switched to WAL: a foreign
    // database is never changed.
    auto mode = exec(db->get(), "PRAGMA journal_mode = WAL", "switching to WAL");
    if (!mode) return mode.error();
    auto wal = pragma_text(db->get(), "PRAGMA journal_mode");
    if (!wal) return wal.error();
    if (*wal != "wal")
      return Error(errc::store_failed, where() + ": cannot use WAL (journal_mode is " + *wal + ")");
    if (*version < current_schema_version) {
      if (auto r = migrate(db->get()); !r) return r;
    }
    const char* sync =
        options.sync == SqliteSync::full ? "PRAGMA synchronous = FULL" : "PRAGMA synchronous = NORMAL";
    if (auto r = exec(db->get(), sync, "setting synchronous"); !r) return r;

    for (auto [target, sql] :
         {std::pair{&begin, "BEGIN IMMEDIATE"}, std::pair{&commit, "COMMIT"},
          std::pair{&rollback, "ROLLBACK"}, std::pair{&upsert_booking, upsert_booking_sql},
          std::pair{&upsert_resource, upsert_resource_sql}, std::pair{&upsert_outbox, upsert_outbox_sql},
          std::pair{&delete_outbox, delete_outbox_sql}}) {
      auto s = prepare(db->get(), sql);
      if (!s) return s.error();
      *target = std::move(*s);
    }
    writer_db = std::move(*db);
    return {};
  }

  result<std::string> pragma_text(sqlite3* db, const char* sql) const {
    sqlite3_stmt* raw = nullptr;
    int rc = sqlite3_prepare_v2(db, sql, -1, &raw, nullptr);
    statement s(raw);
    if (rc == SQLITE_OK) rc = sqlite3_step(s.get());
    if (rc != SQLITE_ROW) return failure(db, rc, sql);
    return std::string(column_text(s.get(), 0));
  }

  result<std::unique_ptr<reader>> open_reader() const {
    auto db = open_connection(SQLITE_OPEN_READONLY);
    if (!db) return db.error();
    auto r = std::make_unique<reader>();
    for (auto [target, sql] : {
             std::pair{&r->begin, "BEGIN"},
             std::pair{&r->end, "COMMIT"},
             std::pair{&r->load, "SELECT booking, idem_key FROM bookings WHERE id = ?1"},
             std::pair{&r->resources, "SELECT id, capacity FROM resources"},
             // The columns in the order of the scan_* constants.
             std::pair{&r->scan,
                       "SELECT status, lines, id, booking, idem_key, fingerprint, user, created_at "
                       "FROM bookings ORDER BY rowid"},
             // CROSS JOIN keeps the (small) outbox the outer loop: with a plain JOIN the planner
             // scans every booking in rowid order for the ORDER BY and looks each up in the
             // outbox, which made a restart over 1,000,000 bookings take 0.35 s longer.
             std::pair{&r->unpublished,
                       "SELECT b.id, b.booking, b.idem_key FROM outbox o CROSS JOIN bookings b "
                       "ON b.id = o.booking_id ORDER BY b.rowid"},
         }) {
      auto s = prepare(db->get(), sql);
      if (!s) return s.error();
      *target = std::move(*s);
    }
    r->db = std::move(*db);
    return r;
  }

  result<void> open_readers() {
    for (std::size_t i = 0; i < options.read_connections; ++i) {
      auto r = open_reader();
      if (!r) return r.error();
      idle_readers.push_back(std::move(*r));
    }
    return {};
  }

  // ---- reading ----

  // A reader taken from the pool for one call; returned when the lease ends.
  class reader_lease {
   public:
    explicit reader_lease(const impl& owner) : owner_(owner) {
      std::unique_lock lock(owner_.readers_mutex);
      owner_.readers_cv.wait(lock, [&] { return !owner_.idle_readers.empty(); });
      reader_ = std::move(owner_.idle_readers.back());
      owner_.idle_readers.pop_back();
    }
    ~reader_lease() {
      {
        std::lock_guard lock(owner_.readers_mutex);
        owner_.idle_readers.push_back(std::move(reader_));
      }
      owner_.readers_cv.notify_one();
    }
    reader_lease(const reader_lease&) = delete;
    reader_lease& operator=(const reader_lease&) = delete;
    reader* operator->() const noexcept { return reader_.get(); }
    reader& operator*() const noexcept { return *reader_; }

   private:
    const impl& owner_;
    std::unique_ptr<reader> reader_;
  };

  // The booking a row's JSON and idempotency key describe.
  result<Booking> booking_of(std::string_view id, std::string_view json,
                             std::string_view idempotency_key) const {
    boost::system::error_code ec;
    auto value = boost::json::parse(json, ec);
    if (ec)
      return Error(errc::store_failed,
                   where() + ": booking '" + std::string(id) + "' is stored as malformed JSON");
    auto b = booking_from_json(value);
    if (!b)
      return Error(errc::store_failed,
                   where() + ": booking '" + std::string(id) + "' is stored malformed: " + b.error().message);
    b->idempotency_key = std::string(idempotency_key);
    return b;
  }

  result<std::optional<Booking>> load(std::string_view booking_id) const {
    reader_lease r(*this);
    statement_use use(r->load.get());
    if (int rc = bind_text(use.get(), 1, booking_id); rc != SQLITE_OK)
      return failure(r->db.get(), rc, "loading");
    const int rc = sqlite3_step(use.get());
    if (rc == SQLITE_DONE) return std::optional<Booking>{};
    if (rc != SQLITE_ROW) return failure(r->db.get(), rc, "loading a booking");
    auto b = booking_of(booking_id, column_text(use.get(), 0), column_text(use.get(), 1));
    if (!b) return b.error();
    return std::optional<Booking>{std::move(*b)};
  }

  result<RecoveredState> recover(wall_clock::time_point keys_since) const {
    reader_lease r(*this);
    sqlite3* db = r->db.get();
    // One read transaction: every query below sees the same committed state.
    statement_use begin_use(r->begin.get());
    if (int rc = sqlite3_step(begin_use.get()); rc != SQLITE_DONE) return failure(db, rc, "recovering");
    auto outcome = recover_in_transaction(*r, keys_since);
    statement_use end_use(r->end.get());
    const int rc = sqlite3_step(end_use.get());
    if (!outcome) return outcome;
    if (rc != SQLITE_DONE) return failure(db, rc, "recovering");
    return outcome;
  }

  result<RecoveredState> recover_in_transaction(reader& r, wall_clock::time_point keys_since) const {
    sqlite3* db = r.db.get();
    detail::RecoveryBuilder builder;
    int rc;
    {
      statement_use use(r.resources.get());
      while ((rc = sqlite3_step(use.get())) == SQLITE_ROW) {
        const auto capacity = sqlite3_column_int64(use.get(), 1);
        if (capacity < 0 || capacity > std::numeric_limits<std::uint32_t>::max())
          return Error(errc::store_failed, where() + ": resource '" + std::string(column_text(use.get(), 0)) +
                                               "' has an invalid capacity " + std::to_string(capacity));
        builder.resource(column_text(use.get(), 0), static_cast<std::uint32_t>(capacity));
      }
      if (rc != SQLITE_DONE) return failure(db, rc, "recovering resources");
    }
    {
      // One pass in first-stored order does it all: the counts come from the compact `lines`
      // column; only processing and held rows have their JSON parsed. (Indexes would not help:
      // the counts need every confirmed row, so the table is read in full anyway.)
      statement_use use(r.scan.get());
      const auto since_ms =
          std::chrono::floor<std::chrono::milliseconds>(keys_since.time_since_epoch()).count();
      std::vector<BookingLine> lines;
      while ((rc = sqlite3_step(use.get())) == SQLITE_ROW) {
        sqlite3_stmt* row = use.get();
        const auto status_text = column_text(row, scan_status);
        const auto status = parse_booking_status(status_text);
        if (!status)
          return Error(errc::store_failed, where() + ": booking '" + std::string(column_text(row, scan_id)) +
                                               "' has an unknown status '" + std::string(status_text) + "'");
        if (*status == BookingStatus::held || *status == BookingStatus::confirmed) {
          if (!decode_lines(column_text(row, scan_lines), lines))
            return Error(errc::store_failed,
                         where() + ": booking '" + std::string(column_text(row, scan_id)) +
                             "' has malformed lines '" + std::string(column_text(row, scan_lines)) + "'");
          builder.booking_lines(*status, lines);
        }
        if (*status == BookingStatus::held || *status == BookingStatus::processing) {
          const auto id = column_text(row, scan_id);
          auto b = booking_of(id, column_text(row, scan_booking), column_text(row, scan_idem_key));
          if (!b) return b.error();
          if (b->status != *status)
            return Error(errc::store_failed, where() + ": booking '" + std::string(id) + "' has status '" +
                                                 std::string(status_text) + "' but its JSON says '" +
                                                 to_string(b->status) + "'");
          (*status == BookingStatus::processing ? builder.state.processing : builder.state.held)
              .push_back(std::move(*b));
        }
        if (sqlite3_column_type(row, scan_idem_key) != SQLITE_NULL &&
            sqlite3_column_int64(row, scan_created_at) >= since_ms) {
          builder.state.keys.push_back(StoredKey{
              std::string(column_text(row, scan_user)), std::string(column_text(row, scan_idem_key)),
              std::string(column_text(row, scan_fingerprint)), std::string(column_text(row, scan_id)),
              wall_clock::time_point(std::chrono::duration_cast<wall_clock::duration>(
                  std::chrono::milliseconds(sqlite3_column_int64(row, scan_created_at))))});
        }
      }
      if (rc != SQLITE_DONE) return failure(db, rc, "recovering bookings");
    }
    {
      statement_use use(r.unpublished.get());
      while ((rc = sqlite3_step(use.get())) == SQLITE_ROW) {
        auto b = booking_of(column_text(use.get(), 0), column_text(use.get(), 1), column_text(use.get(), 2));
        if (!b) return b.error();
        builder.state.unpublished.push_back(std::move(*b));
      }
      if (rc != SQLITE_DONE) return failure(db, rc, "recovering the outbox");
    }
    return builder.finish();
  }

  // ---- writing ----

  void enqueue(pending p) {
    {
      std::unique_lock lock(queue_mutex);
      if (!closed) {
        queue.push_back(std::move(p));
        lock.unlock();
        queue_cv.notify_one();
        return;
      }
    }
    if (p.done) p.done(Error(errc::store_failed, where() + " is closed"));
  }

  result<void> write_row(const booking_row& row) {
    sqlite3_stmt* s = upsert_booking.get();
    statement_use use(s);
    int rc = bind_text(s, 1, row.id);
    if (rc == SQLITE_OK) rc = bind_text(s, 2, row.user);
    if (rc == SQLITE_OK) rc = bind_text(s, 3, row.status);
    if (rc == SQLITE_OK) rc = bind_text_or_null(s, 4, row.idempotency_key);
    if (rc == SQLITE_OK) rc = bind_text_or_null(s, 5, row.fingerprint);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(s, 6, row.created_at_ms);
    if (rc == SQLITE_OK) rc = bind_text(s, 7, row.lines);
    if (rc == SQLITE_OK) rc = bind_text(s, 8, row.json);
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return failure(writer_db.get(), rc, "storing booking '" + row.id + "'");
    // The version is not published yet: one row in the outbox, in the same transaction.
    sqlite3_stmt* o = upsert_outbox.get();
    statement_use outbox_use(o);
    rc = bind_text(o, 1, row.id);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(o, 2, static_cast<std::int64_t>(row.version));
    if (rc == SQLITE_OK) rc = sqlite3_step(o);
    if (rc != SQLITE_DONE)
      return failure(writer_db.get(), rc, "adding booking '" + row.id + "' to the outbox");
    return {};
  }

  result<void> write_mark(const published_mark& mark) {
    sqlite3_stmt* s = delete_outbox.get();
    statement_use use(s);
    int rc = bind_text(s, 1, mark.id);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(s, 2, static_cast<std::int64_t>(mark.version));
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    if (rc != SQLITE_DONE)
      return failure(writer_db.get(), rc, "removing booking '" + mark.id + "' from the outbox");
    return {};
  }

  result<void> write_row(const resource_row& row) {
    sqlite3_stmt* s = upsert_resource.get();
    statement_use use(s);
    int rc = bind_text(s, 1, row.id);
    if (rc == SQLITE_OK) rc = sqlite3_bind_int64(s, 2, row.capacity);
    if (rc == SQLITE_OK) rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return failure(writer_db.get(), rc, "storing resource '" + row.id + "'");
    return {};
  }

  result<void> step_once(sqlite3_stmt* s, std::string_view doing) {
    statement_use use(s);
    const int rc = sqlite3_step(s);
    if (rc != SQLITE_DONE) return failure(writer_db.get(), rc, doing);
    return {};
  }

  // One transaction for the whole group: all of it is stored, or none. The published marks ride
  // along (no transaction of their own); when the transaction fails they are forgotten, which
  // at worst has a version relayed again after a restart (the bus drops it as a duplicate).
  result<void> write_group(const std::vector<pending>& group,
                           const std::vector<published_mark>& marks) noexcept {
    result<void> outcome;
    try {
      outcome = step_once(begin.get(), "starting a transaction");
      for (std::size_t i = 0; i < group.size() && outcome; ++i)
        outcome = std::visit([&](const auto& row) { return write_row(row); }, group[i].row);
      for (std::size_t i = 0; i < marks.size() && outcome; ++i) outcome = write_mark(marks[i]);
      if (outcome) outcome = step_once(commit.get(), "committing");
    } catch (const std::exception& e) {
      outcome = Error(errc::store_failed, where() + ": " + e.what());
    } catch (...) {
      outcome = Error(errc::store_failed, where() + ": unknown exception while writing");
    }
    // A failed COMMIT can leave the transaction open (e.g. SQLITE_BUSY): end it, so the next
    // group starts clean.
    if (!sqlite3_get_autocommit(writer_db.get())) {
      statement_use use(rollback.get());
      sqlite3_step(use.get());
    }
    return outcome;
  }

  static void run_writer(std::shared_ptr<impl> self) { self->writer_loop(); }

  void writer_loop() {
    std::vector<pending> group;
    std::vector<published_mark> marks;
    for (;;) {
      try {
        {
          std::unique_lock lock(queue_mutex);
          queue_cv.wait(lock, [&] { return stopping || !queue.empty(); });
          if (queue.empty()) {
            closed = true;  // the completer writes the last marks, once the last callbacks ran
            break;
          }
          // One at a time: should push_back fail to allocate, the change stays queued intact.
          while (!queue.empty() && group.size() < options.max_group) {
            group.push_back(std::move(queue.front()));
            queue.pop_front();
          }
        }
        {
          std::lock_guard lock(marks_mutex);
          marks.swap(published_marks);
        }
        auto outcome = write_group(group, marks);
        transactions.fetch_add(1, std::memory_order_relaxed);
        hand_over(std::move(group), std::move(outcome));
      } catch (const std::exception& e) {
        // Only allocation can throw here. What was taken fails loudly; nothing is dropped.
        hand_over(std::move(group), Error(errc::store_failed, where() + ": " + e.what()));
      }
      group = {};
      marks.clear();
    }
    {
      std::lock_guard lock(done_mutex);
      writer_finished = true;
    }
    done_cv.notify_one();
  }

  // Queues a group's callbacks for the completer, in commit order.
  void hand_over(std::vector<pending> group, result<void> outcome) noexcept {
    try {
      {
        std::lock_guard lock(done_mutex);
        done_queue.emplace_back(std::move(group), std::move(outcome));
      }
      done_cv.notify_one();
    } catch (...) {
      // Out of memory: fail the group here, possibly before earlier groups' callbacks ran.
      finish(group, Error(errc::store_failed, where() + ": out of memory"));
    }
  }

  static void run_completer(std::shared_ptr<impl> self) { self->completer_loop(); }

  void completer_loop() {
    current_writer = this;  // callbacks run here: commit() from one must not wait for itself
    for (;;) {
      std::pair<std::vector<pending>, result<void>> next;
      {
        std::unique_lock lock(done_mutex);
        done_cv.wait(lock, [&] { return writer_finished || !done_queue.empty(); });
        if (done_queue.empty()) break;
        next = std::move(done_queue.front());
        done_queue.pop_front();
      }
      finish(next.first, next.second);
      hand_over_marks();
    }
    current_writer = nullptr;
    // The writer has stopped and the last callbacks ran: the marks still waiting get a
    // transaction of their own (a restart would relay those versions again otherwise, for the
    // bus to drop), on this thread, the only one left using the writer's connection.
    std::vector<published_mark> last;
    {
      std::lock_guard lock(marks_mutex);
      marks_closed = true;
      last.swap(published_marks);
    }
    if (!last.empty()) {
      (void)write_group({}, last);
      transactions.fetch_add(1, std::memory_order_relaxed);
    }
  }

  void hand_over_marks() noexcept {
    if (completer_marks.empty()) return;
    try {
      std::lock_guard lock(marks_mutex);
      published_marks.insert(published_marks.end(), std::make_move_iterator(completer_marks.begin()),
                             std::make_move_iterator(completer_marks.end()));
    } catch (...) {
      // Out of memory: these marks are lost; their versions are at worst relayed again.
    }
    completer_marks.clear();
  }

  // Runs the callbacks of a group in commit order, each once, and destroys each after it ran.
  // A callback may hold the last reference to the store: its destructor then only asks this loop
  // to stop once the queue is empty.
  static void finish(std::vector<pending>& group, const result<void>& outcome) noexcept {
    for (auto& p : group) {
      if (!p.done) continue;
      auto done = std::move(p.done);
      p.done = nullptr;
      try {
        done(outcome);
      } catch (...) {
        // A throwing callback must not stop the writer nor keep the others from running.
      }
    }
  }

  // True on the thread that runs the callbacks (the completer).
  bool on_writer_thread() const noexcept { return current_writer == this; }
};

SqliteStore::SqliteStore(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

SqliteStore::~SqliteStore() {
  {
    std::lock_guard lock(impl_->queue_mutex);
    impl_->stopping = true;
  }
  impl_->queue_cv.notify_one();
  if (impl_->on_writer_thread()) {
    // The last reference went away in a commit callback: the completer cannot wait for itself.
    // Both threads keep impl alive, finish the queue, and the last one closes the database.
    impl_->writer.detach();
    impl_->completer.detach();
  } else {
    if (impl_->writer.joinable()) impl_->writer.join();
    if (impl_->completer.joinable()) impl_->completer.join();
  }
}

result<std::shared_ptr<SqliteStore>> SqliteStore::open(const std::string& path, SqliteOptions options) {
  try {
    auto state = std::make_shared<impl>(path, options);
    if (auto r = state->open_writer(); !r) return r.error();
    if (auto r = state->open_readers(); !r) return r.error();
    state->completer = std::thread(&impl::run_completer, state);
    state->writer = std::thread(&impl::run_writer, state);
    return std::shared_ptr<SqliteStore>(new SqliteStore(std::move(state)));
  } catch (const std::exception& e) {
    return Error(errc::store_failed, "cannot open SQLite database '" + path + "': " + e.what());
  }
}

void SqliteStore::commit_async(const StateChange& change, CommitCallback done) {
  pending p;
  try {
    const Booking& b = change.booking;
    p.row = booking_row{b.id,
                        b.user,
                        to_string(b.status),
                        b.idempotency_key,
                        std::string(change.fingerprint),
                        unix_ms(b.created_at),
                        encode_lines(b.lines),
                        boost::json::serialize(to_json(b)),
                        b.version};
  } catch (const std::exception& e) {
    if (done) done(Error(errc::store_failed, impl_->where() + ": cannot serialise booking: " + e.what()));
    return;
  }
  p.done = std::move(done);
  impl_->enqueue(std::move(p));
}

result<void> SqliteStore::commit(const StateChange& change) {
  if (impl_->on_writer_thread())
    return Error(errc::store_failed,
                 impl_->where() + ": commit() called from a commit callback would wait for itself");
  auto w = std::make_shared<waiter>();
  commit_async(change, w->callback(w));
  return w->wait();
}

result<void> SqliteStore::put_resource(std::string_view resource_id, std::uint32_t capacity) {
  if (impl_->on_writer_thread())
    return Error(errc::store_failed,
                 impl_->where() + ": put_resource() called from a commit callback would wait for itself");
  auto w = std::make_shared<waiter>();
  impl_->enqueue(pending{resource_row{std::string(resource_id), capacity}, w->callback(w)});
  return w->wait();
}

result<std::optional<Booking>> SqliteStore::load(std::string_view booking_id) const {
  try {
    return impl_->load(booking_id);
  } catch (const std::exception& e) {
    return Error(errc::store_failed, impl_->where() + ": " + e.what());
  }
}

result<RecoveredState> SqliteStore::recover(wall_clock::time_point keys_since) {
  try {
    return impl_->recover(keys_since);
  } catch (const std::exception& e) {
    return Error(errc::store_failed, impl_->where() + ": " + e.what());
  }
}

void SqliteStore::published(std::string_view booking_id, std::uint64_t version) {
  try {
    if (impl_->on_writer_thread()) {
      impl_->completer_marks.push_back({std::string(booking_id), version});
      return;
    }
    std::lock_guard lock(impl_->marks_mutex);
    if (!impl_->marks_closed) impl_->published_marks.push_back({std::string(booking_id), version});
  } catch (...) {
    // Out of memory: the mark is lost, and the version at worst relayed again after a restart.
  }
}

const std::string& SqliteStore::path() const noexcept { return impl_->path; }
SqliteSync SqliteStore::sync() const noexcept { return impl_->options.sync; }
std::uint64_t SqliteStore::transactions() const noexcept {
  return impl_->transactions.load(std::memory_order_relaxed);
}
std::size_t SqliteStore::queued() const {
  std::lock_guard lock(impl_->queue_mutex);
  return impl_->queue.size();
}

}  // namespace pushbook
