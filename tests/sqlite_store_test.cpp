#include <pushbook/sqlite_store.hpp>

#include "temp_dir.hpp"

#include <doctest/doctest.h>
#include <sqlite3.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

using namespace pushbook;
using std::chrono::milliseconds;
namespace fs = std::filesystem;

namespace {

// A fresh directory under /tmp, removed with everything in it at the end of the test.
struct temp_dir : test::TempDir {
  temp_dir() : test::TempDir("pushbook-sqlite") {}
};

wall_clock::time_point at_ms(std::int64_t ms) { return wall_clock::time_point(milliseconds(ms)); }

Booking make_booking(std::string id, BookingStatus status, std::vector<BookingLine> lines,
                     std::string key = {}, std::int64_t created_ms = 1700000000000) {
  Booking b;
  b.id = std::move(id);
  b.user = "u1";
  b.lines = std::move(lines);
  b.status = status;
  b.idempotency_key = std::move(key);
  b.created_at = at_ms(created_ms);
  b.updated_at = at_ms(created_ms + 5);
  if (status == BookingStatus::held) b.expires_at = at_ms(created_ms + 60000);
  return b;
}

result<void> commit(BookingStore& store, const Booking& b, std::string_view fingerprint = {}) {
  return store.commit(StateChange{b, {}, fingerprint});
}

std::shared_ptr<SqliteStore> open_ok(const std::string& path, SqliteOptions options = {}) {
  auto store = SqliteStore::open(path, options);
  if (!store) FAIL(store.error().message);
  return *store;
}

// Waits for `done()` with a deadline instead of a bare sleep.
template <class Pred>
bool wait_for(Pred done, std::chrono::seconds deadline = std::chrono::seconds(30)) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// Counts finished callbacks so a test can wait for all of them.
struct completion {
  std::mutex mutex;
  std::condition_variable cv;
  std::size_t done = 0;
  std::size_t failed = 0;
  void add(const result<void>& r) {
    std::lock_guard lock(mutex);
    ++done;
    if (!r) ++failed;
    cv.notify_all();
  }
  bool wait(std::size_t n) {
    std::unique_lock lock(mutex);
    return cv.wait_for(lock, std::chrono::seconds(60), [&] { return done >= n; });
  }
};

// A second connection, as another process would hold one.
class raw_db {
 public:
  explicit raw_db(const std::string& path) {
    REQUIRE(sqlite3_open(path.c_str(), &db_) == SQLITE_OK);
    sqlite3_busy_timeout(db_, 5000);
  }
  ~raw_db() { sqlite3_close(db_); }
  raw_db(const raw_db&) = delete;
  raw_db& operator=(const raw_db&) = delete;
  int exec(const std::string& sql) { return sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, nullptr); }
  std::string text(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    REQUIRE(sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) == SQLITE_OK);
    std::string out;
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0))
      out = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
    sqlite3_finalize(s);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
};

std::string file_contents(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::vector<std::string> ids_of(const std::vector<Booking>& bookings) {
  std::vector<std::string> ids;
  for (const auto& b : bookings) ids.push_back(b.id);
  return ids;
}

}  // namespace

TEST_CASE("commit then load gives back the booking, field by field") {
  temp_dir dir;
  auto store = open_ok(dir.file("db"));
  CHECK(store->path() == dir.file("db"));
  CHECK(store->sync() == SqliteSync::normal);

  auto b = make_booking("b1", BookingStatus::held, {{"room-1", 2}, {"room-2", 1}}, "key-1");
  b.metadata = boost::json::parse(R"({"note":"window seat","n":3})").as_object();
  b.reason_message = "held for payment";
  b.hold_for = milliseconds(60000);
  b.version = 2;
  REQUIRE(commit(*store, b, "fp-1"));

  auto loaded = store->load("b1").value();
  REQUIRE(loaded.has_value());
  CHECK(loaded->id == "b1");
  CHECK(loaded->user == "u1");
  CHECK(loaded->lines == std::vector<BookingLine>{{"room-1", 2}, {"room-2", 1}});
  CHECK(boost::json::serialize(loaded->metadata) == R"({"note":"window seat","n":3})");
  CHECK(loaded->idempotency_key == "key-1");
  CHECK(loaded->status == BookingStatus::held);
  CHECK(loaded->reason == RejectReason::none);
  CHECK(loaded->reason_message == "held for payment");
  CHECK(loaded->hold_for == milliseconds(60000));
  CHECK(loaded->expires_at == at_ms(1700000060000));
  CHECK(loaded->created_at == at_ms(1700000000000));
  CHECK(loaded->updated_at == at_ms(1700000000005));
  CHECK(loaded->version == 2);
}

TEST_CASE("load tells a missing booking apart from a store that cannot be read") {
  temp_dir dir;
  const auto path = dir.file("db");
  auto store = open_ok(path);
  REQUIRE(commit(*store, make_booking("b1", BookingStatus::confirmed, {{"r", 1}})));
  auto missing = store->load("nope");
  REQUIRE(missing.has_value());
  CHECK_FALSE(missing->has_value());

  raw_db other(path);
  REQUIRE(other.exec("UPDATE bookings SET booking = '{\"booking_id\":' WHERE id = 'b1'") == SQLITE_OK);
  auto malformed = store->load("b1");
  REQUIRE_FALSE(malformed.has_value());
  CHECK(malformed.error().is(errc::store_failed));
  CHECK(malformed.error().message ==
        "SQLite database '" + path + "': booking 'b1' is stored as malformed JSON");

  REQUIRE(other.exec("DROP TABLE bookings") == SQLITE_OK);
  auto unreadable = store->load("nope");
  REQUIRE_FALSE(unreadable.has_value());
  CHECK(unreadable.error().is(errc::store_failed));
  CHECK(unreadable.error().message ==
        "SQLite database '" + path + "': loading a booking: no such table: bookings");
}

TEST_CASE("a new version replaces the previous one and keeps the booking's first-stored place") {
  temp_dir dir;
  const auto path = dir.file("db");
  auto store = open_ok(path);
  auto a = make_booking("a", BookingStatus::processing, {{"r", 1}}, "ka");
  REQUIRE(commit(*store, a, "fp-a"));
  REQUIRE(commit(*store, make_booking("b", BookingStatus::processing, {{"r", 1}})));
  a.version = 2;
  a.reason_message = "second version";
  REQUIRE(commit(*store, a));  // no fingerprint on later versions: the first one is kept

  auto loaded = store->load("a").value();
  REQUIRE(loaded.has_value());
  CHECK(loaded->version == 2);
  CHECK(loaded->reason_message == "second version");
  auto state = store->recover(at_ms(0)).value();
  CHECK(ids_of(state.processing) == std::vector<std::string>{"a", "b"});
  REQUIRE(state.keys.size() == 1);
  CHECK(state.keys[0].fingerprint == "fp-a");

  a.version = 3;
  a.status = BookingStatus::confirmed;
  REQUIRE(commit(*store, a));
  raw_db other(path);
  CHECK(other.text("SELECT count(*) FROM bookings") == "2");
  CHECK(other.text(
            "SELECT group_concat(id || ':' || status, ',') FROM (SELECT * FROM bookings ORDER BY rowid)") ==
        "a:confirmed,b:processing");
}

TEST_CASE(
    "commit_async runs the callbacks in commit order, one at a time, on the store's completion thread") {
  temp_dir dir;
  auto store = open_ok(dir.file("db"));
  constexpr int n = 1000;
  std::vector<int> order;  // touched only by callbacks, which never overlap
  std::vector<std::thread::id> threads;
  std::atomic<int> running{0};
  std::atomic<bool> overlapped{false};
  completion all;
  for (int i = 0; i < n; ++i) {
    auto b = make_booking("b" + std::to_string(i), BookingStatus::confirmed, {{"r", 1}});
    store->commit_async(StateChange{b, {}, {}}, [&, i](result<void> r) {
      if (running.fetch_add(1) != 0) overlapped = true;
      order.push_back(i);
      threads.push_back(std::this_thread::get_id());
      running.fetch_sub(1);
      all.add(r);
    });
  }  // each Booking is gone before its commit runs: commit_async copied what it needs
  REQUIRE(all.wait(n));
  CHECK(all.failed == 0);
  CHECK_FALSE(overlapped.load());
  std::vector<int> expected(n);
  for (int i = 0; i < n; ++i) expected[static_cast<std::size_t>(i)] = i;
  CHECK(order == expected);
  CHECK(std::count(threads.begin(), threads.end(), threads.front()) == n);
  CHECK(threads.front() != std::this_thread::get_id());
  CHECK(store->load("b999").value().has_value());
}

TEST_CASE("concurrent commits are grouped into few transactions") {
  temp_dir dir;
  SqliteOptions options;
  options.max_group = 1024;
  options.busy_timeout = std::chrono::seconds(30);
  const auto path = dir.file("db");
  auto store = open_ok(path, options);
  REQUIRE(commit(*store, make_booking("setup", BookingStatus::confirmed, {{"r", 1}})));

  // Another connection's lock holds the writer in the first transaction (waiting on
  // busy_timeout) until 2000 more changes are queued behind it.
  raw_db other(path);
  REQUIRE(other.exec("BEGIN EXCLUSIVE") == SQLITE_OK);
  completion all;
  const auto before = store->transactions();
  auto first = make_booking("first", BookingStatus::confirmed, {{"r", 1}});
  store->commit_async(StateChange{first, {}, {}}, [&](result<void> r) { all.add(r); });
  REQUIRE(wait_for([&] { return store->queued() == 0; }));  // taken: the writer waits for the lock
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        auto b = make_booking("t" + std::to_string(t) + "-" + std::to_string(i), BookingStatus::confirmed,
                              {{"r", 1}});
        store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) { all.add(r); });
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(store->queued() == 2000);
  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  REQUIRE(all.wait(2001));
  CHECK(all.failed == 0);
  // One transaction for "first", then 2000 queued changes in groups of at most 1024.
  CHECK(store->transactions() - before == 3);
  CHECK(store->queued() == 0);
  CHECK(store->recover(at_ms(0)).value().resources.at(0).confirmed == 2002);
}

TEST_CASE("concurrent synchronous commit() callers share one transaction") {
  temp_dir dir;
  SqliteOptions options;
  options.busy_timeout = std::chrono::seconds(30);
  const auto path = dir.file("db");
  auto store = open_ok(path, options);
  REQUIRE(commit(*store, make_booking("setup", BookingStatus::confirmed, {{"r", 1}})));
  raw_db other(path);  // holds the writer in the first transaction, as above
  REQUIRE(other.exec("BEGIN EXCLUSIVE") == SQLITE_OK);
  const auto before = store->transactions();
  auto first = make_booking("first", BookingStatus::confirmed, {{"r", 1}});
  store->commit_async(StateChange{first, {}, {}}, [](result<void>) {});
  REQUIRE(wait_for([&] { return store->queued() == 0; }));
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      if (commit(*store, make_booking("s" + std::to_string(t), BookingStatus::confirmed, {{"r", 1}}))) ++ok;
    });
  }
  CHECK(wait_for([&] { return store->queued() == 8; }));
  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  for (auto& t : threads) t.join();
  CHECK(ok.load() == 8);
  CHECK(store->transactions() - before == 2);
}

TEST_CASE("recover after close and reopen: counts recomputed, processing order, held, recent keys") {
  temp_dir dir;
  const auto path = dir.file("db");
  MemoryStore memory;  // the reference: recover must give what MemoryStore gives
  {
    auto store = open_ok(path);
    for (BookingStore* s : {static_cast<BookingStore*>(store.get()), static_cast<BookingStore*>(&memory)}) {
      REQUIRE(s->put_resource("r1", 10));
      REQUIRE(s->put_resource("r2", 5));
      REQUIRE(s->put_resource("r3", 7));
      REQUIRE(commit(*s, make_booking("c1", BookingStatus::confirmed, {{"r1", 2}}, "k-old", 1000), "fp-old"));
      REQUIRE(commit(*s, make_booking("c2", BookingStatus::confirmed, {{"r1", 1}, {"r-gone", 4}})));
      REQUIRE(
          commit(*s, make_booking("h1", BookingStatus::held, {{"r1", 1}, {"r2", 1}}, "k-h1", 5000), "fp-h1"));
      REQUIRE(commit(*s, make_booking("p2", BookingStatus::processing, {{"r2", 3}}, "k-p2", 6000), "fp-p2"));
      REQUIRE(commit(*s, make_booking("p1", BookingStatus::processing, {{"r2", 1}})));
      REQUIRE(commit(*s, make_booking("x1", BookingStatus::rejected, {{"r1", 9}})));
      REQUIRE(commit(*s, make_booking("x2", BookingStatus::cancelled, {{"r3", 2}}, "k-x2", 7000), "fp-x2"));
    }
  }  // closed
  auto store = open_ok(path);
  auto state = store->recover(at_ms(5000)).value();

  REQUIRE(state.resources.size() == 4);
  auto check_resource = [](const ResourceState& r, const char* id, std::uint32_t capacity,
                           std::uint32_t reserved, std::uint32_t confirmed) {
    CHECK(r.id == id);
    CHECK(r.capacity == capacity);
    CHECK(r.reserved == reserved);
    CHECK(r.confirmed == confirmed);
  };
  check_resource(state.resources[0], "r-gone", 0, 0, 4);  // booked without a resource row: still counted
  check_resource(state.resources[1], "r1", 10, 1, 3);
  check_resource(state.resources[2], "r2", 5, 1, 0);
  check_resource(state.resources[3], "r3", 7, 0, 0);
  CHECK(ids_of(state.processing) == std::vector<std::string>{"p2", "p1"});  // first-stored order
  CHECK(state.processing[0].idempotency_key == "k-p2");
  CHECK(ids_of(state.held) == std::vector<std::string>{"h1"});
  CHECK(state.held[0].expires_at == at_ms(65000));
  auto by_booking = [](const StoredKey& a, const StoredKey& b) { return a.booking_id < b.booking_id; };
  std::sort(state.keys.begin(), state.keys.end(), by_booking);
  REQUIRE(state.keys.size() == 3);  // k-old was created before keys_since
  CHECK(state.keys[0].booking_id == "h1");
  CHECK(state.keys[0].user == "u1");
  CHECK(state.keys[0].key == "k-h1");
  CHECK(state.keys[0].fingerprint == "fp-h1");
  CHECK(state.keys[0].created_at == at_ms(5000));
  CHECK(state.keys[1].key == "k-p2");
  CHECK(state.keys[2].key == "k-x2");

  auto reference = memory.recover(at_ms(5000)).value();
  REQUIRE(reference.resources.size() == state.resources.size());
  for (std::size_t i = 0; i < state.resources.size(); ++i) {
    CHECK(reference.resources[i].id == state.resources[i].id);
    CHECK(reference.resources[i].capacity == state.resources[i].capacity);
    CHECK(reference.resources[i].reserved == state.resources[i].reserved);
    CHECK(reference.resources[i].confirmed == state.resources[i].confirmed);
  }
  CHECK(ids_of(reference.processing) == ids_of(state.processing));
  CHECK(ids_of(reference.held) == ids_of(state.held));
  std::sort(reference.keys.begin(), reference.keys.end(), by_booking);
  REQUIRE(reference.keys.size() == state.keys.size());
  for (std::size_t i = 0; i < state.keys.size(); ++i) {
    CHECK(reference.keys[i].key == state.keys[i].key);
    CHECK(reference.keys[i].fingerprint == state.keys[i].fingerprint);
    CHECK(reference.keys[i].created_at == state.keys[i].created_at);
  }
}

TEST_CASE("resource ids with spaces, semicolons and percent signs keep their counts") {
  temp_dir dir;
  auto store = open_ok(dir.file("db"));
  REQUIRE(commit(*store, make_booking("b", BookingStatus::confirmed, {{"a b;c%20", 2}, {"%", 3}})));
  auto state = store->recover(at_ms(0)).value();
  REQUIRE(state.resources.size() == 2);
  CHECK(state.resources[0].id == "%");
  CHECK(state.resources[0].confirmed == 3);
  CHECK(state.resources[1].id == "a b;c%20");
  CHECK(state.resources[1].confirmed == 2);
}

TEST_CASE("recover refuses a corrupt row instead of skipping it") {
  temp_dir dir;
  const auto path = dir.file("db");
  auto store = open_ok(path);
  REQUIRE(commit(*store, make_booking("b1", BookingStatus::confirmed, {{"r", 2}})));
  raw_db other(path);
  REQUIRE(other.exec("UPDATE bookings SET lines = 'r two' WHERE id = 'b1'") == SQLITE_OK);
  auto bad_lines = store->recover(at_ms(0));
  REQUIRE_FALSE(bad_lines.has_value());
  CHECK(bad_lines.error().is(errc::store_failed));
  CHECK(bad_lines.error().message ==
        "SQLite database '" + path + "': booking 'b1' has malformed lines 'r two'");

  REQUIRE(other.exec("UPDATE bookings SET lines = 'r 2', status = 'paid' WHERE id = 'b1'") == SQLITE_OK);
  auto bad_status = store->recover(at_ms(0));
  REQUIRE_FALSE(bad_status.has_value());
  CHECK(bad_status.error().message ==
        "SQLite database '" + path + "': booking 'b1' has an unknown status 'paid'");
}

TEST_CASE("put_resource creates a resource and changes its capacity, durably") {
  temp_dir dir;
  const auto path = dir.file("db");
  {
    auto store = open_ok(path);
    REQUIRE(store->put_resource("room-1", 3));
    REQUIRE(store->put_resource("room-2", 1));
    REQUIRE(store->put_resource("room-1", 8));
  }
  auto store = open_ok(path);
  auto state = store->recover(at_ms(0)).value();
  REQUIRE(state.resources.size() == 2);
  CHECK(state.resources[0].id == "room-1");
  CHECK(state.resources[0].capacity == 8);
  CHECK(state.resources[1].id == "room-2");
  CHECK(state.resources[1].capacity == 1);
}

TEST_CASE("a file that is not a database is refused and left unchanged") {
  temp_dir dir;
  const auto path = dir.file("notes.txt");
  const std::string text = "these are my notes, not a database; there are enough of them to fill a header.\n";
  std::ofstream(path) << text;
  auto store = SqliteStore::open(path);
  REQUIRE_FALSE(store.has_value());
  CHECK(store.error().is(errc::store_failed));
  CHECK(store.error().message ==
        "SQLite database '" + path + "' is not a pushbook database: file is not a database");
  CHECK(file_contents(path) == text);
}

TEST_CASE("an SQLite database of another application is refused and left unchanged") {
  temp_dir dir;
  const auto path = dir.file("other.db");
  {
    raw_db other(path);
    REQUIRE(other.exec("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)") == SQLITE_OK);
    REQUIRE(other.exec("INSERT INTO customers (name) VALUES ('Ada')") == SQLITE_OK);
  }
  auto store = SqliteStore::open(path);
  REQUIRE_FALSE(store.has_value());
  CHECK(store.error().is(errc::store_failed));
  CHECK(store.error().message ==
        "SQLite database '" + path +
            "' is not a pushbook database (an SQLite database of another application)");
  raw_db other(path);
  CHECK(other.text("PRAGMA journal_mode") == "delete");  // not switched to WAL
  CHECK(other.text("SELECT name FROM customers") == "Ada");

  REQUIRE(other.exec("PRAGMA application_id = 42") == SQLITE_OK);
  auto foreign_id = SqliteStore::open(path);
  REQUIRE_FALSE(foreign_id.has_value());
  CHECK(foreign_id.error().message ==
        "SQLite database '" + path + "' is not a pushbook database (its application_id is 42)");
}

TEST_CASE("a database with a newer schema version is refused") {
  temp_dir dir;
  const auto path = dir.file("db");
  open_ok(path).reset();  // a real pushbook database, version 2
  {
    raw_db other(path);
    CHECK(other.text("PRAGMA user_version") == "2");
    REQUIRE(other.exec("PRAGMA user_version = 3") == SQLITE_OK);
  }
  auto store = SqliteStore::open(path);
  REQUIRE_FALSE(store.has_value());
  CHECK(store.error().is(errc::store_failed));
  CHECK(store.error().message ==
        "SQLite database '" + path + "': database schema version 3 is newer than this pushbook (knows 2)");
}

TEST_CASE("the outbox: a stored version is unpublished until published() says so, lazily") {
  temp_dir dir;
  const auto path = dir.file("db");
  {
    auto store = open_ok(path);
    REQUIRE(store->put_resource("r", 10));
    auto a = make_booking("a", BookingStatus::processing, {{"r", 1}});
    auto b = make_booking("b", BookingStatus::processing, {{"r", 1}});
    auto c = make_booking("c", BookingStatus::processing, {{"r", 1}});
    REQUIRE(commit(*store, a));
    REQUIRE(commit(*store, b));
    REQUIRE(commit(*store, c));
    auto state = store->recover(at_ms(0)).value();
    CHECK(ids_of(state.unpublished) == std::vector<std::string>{"a", "b", "c"});
    // a's version 1 went out; b's version 2 is stored before the mark of its version 1 arrives
    // (the mark must not take the newer version's row with it).
    store->published("a", 1);
    b.status = BookingStatus::confirmed;
    b.version = 2;
    const auto before = store->transactions();
    REQUIRE(commit(*store, b));
    store->published("b", 1);
    // Marks take no transaction of their own: the next commit carries them.
    CHECK(store->transactions() == before + 1);
    REQUIRE(store->put_resource("r", 11));
    state = store->recover(at_ms(0)).value();
    CHECK(ids_of(state.unpublished) == std::vector<std::string>{"b", "c"});
    REQUIRE(state.unpublished.size() == 2);
    CHECK(state.unpublished[0].version == 2);
    CHECK(state.unpublished[0].status == BookingStatus::confirmed);
    store->published("b", 2);
    store->published("c", 1);
  }  // closing writes the marks still waiting for a transaction
  auto store = open_ok(path);
  CHECK(store->recover(at_ms(0)).value().unpublished.empty());
}

TEST_CASE("a version-1 file opens, is upgraded to version 2, and keeps everything") {
  temp_dir dir;
  const auto path = dir.file("db");
  {
    // A version-1 database as a pushbook before the outbox wrote it (its schema, verbatim).
    raw_db v1(path);
    REQUIRE(v1.exec(R"sql(
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
PRAGMA application_id = 1349740610;
PRAGMA user_version = 1;
)sql") == SQLITE_OK);
    auto held = make_booking("h1", BookingStatus::held, {{"r", 2}}, "k1", 5000);
    held.version = 2;
    const auto json = boost::json::serialize(to_json(held));
    REQUIRE(v1.exec("INSERT INTO resources VALUES ('r', 10)") == SQLITE_OK);
    REQUIRE(v1.exec("INSERT INTO bookings VALUES ('h1', 'u1', 'held', 'k1', 'fp1', 5000, 'r 2', '" + json +
                    "')") == SQLITE_OK);
  }
  {
    auto store = open_ok(path);
    auto state = store->recover(at_ms(0)).value();
    REQUIRE(state.held.size() == 1);
    CHECK(state.held[0].id == "h1");
    CHECK(state.held[0].version == 2);
    REQUIRE(state.resources.size() == 1);
    CHECK(state.resources[0].reserved == 2);
    REQUIRE(state.keys.size() == 1);
    CHECK(state.keys[0].fingerprint == "fp1");
    // Bookings of a version-1 file count as published (nothing recorded otherwise).
    CHECK(state.unpublished.empty());
    // New versions go through the outbox.
    auto confirmed = state.held[0];
    confirmed.status = BookingStatus::confirmed;
    confirmed.version = 3;
    REQUIRE(commit(*store, confirmed));
    state = store->recover(at_ms(0)).value();
    REQUIRE(state.unpublished.size() == 1);
    CHECK(state.unpublished[0].version == 3);
  }
  raw_db after(path);
  CHECK(after.text("PRAGMA user_version") == "2");
  CHECK(after.text("SELECT version FROM outbox WHERE booking_id = 'h1'") == "3");
}

TEST_CASE("a path that cannot be opened or created is refused") {
  temp_dir dir;
  const auto missing_dir = dir.file("no-such-dir/db");
  auto in_missing = SqliteStore::open(missing_dir);
  REQUIRE_FALSE(in_missing.has_value());
  CHECK(in_missing.error().is(errc::store_failed));
  CHECK(in_missing.error().message == "cannot open SQLite database '" + missing_dir +
                                          "': unable to open database file (No such file or directory)");

  const auto a_directory = dir.file("");
  auto directory = SqliteStore::open(a_directory);
  REQUIRE_FALSE(directory.has_value());
  CHECK(directory.error().message == "cannot open SQLite database '" + a_directory + "': it is a directory");

  // Root may write anywhere, but not below /proc: a path no permission bit stops.
  auto in_proc = SqliteStore::open("/proc/pushbook.db");
  REQUIRE_FALSE(in_proc.has_value());
  CHECK(in_proc.error().is(errc::store_failed));
  CHECK(in_proc.error().message ==
        "cannot open SQLite database '/proc/pushbook.db': unable to open database file (No such file or "
        "directory)");

  auto empty = SqliteStore::open("");
  REQUIRE_FALSE(empty.has_value());
  CHECK(empty.error().message == "SQLite store: '' is not a file name (a durable store needs one)");
}

TEST_CASE("a database locked by another connection: commits fail after busy_timeout, then work again") {
  temp_dir dir;
  const auto path = dir.file("db");
  SqliteOptions options;
  options.busy_timeout = milliseconds(50);
  auto store = open_ok(path, options);
  REQUIRE(commit(*store, make_booking("before", BookingStatus::confirmed, {{"r", 1}})));

  raw_db other(path);
  REQUIRE(other.exec("BEGIN EXCLUSIVE") == SQLITE_OK);
  const std::string locked =
      "SQLite database '" + path +
      "': starting a transaction: database is locked (another connection holds it longer "
      "than busy_timeout, 50 ms)";
  auto failed = commit(*store, make_booking("during", BookingStatus::confirmed, {{"r", 1}}));
  REQUIRE_FALSE(failed.has_value());
  CHECK(failed.error().is(errc::store_failed));
  CHECK(failed.error().message == locked);
  completion group;  // queued together: each fails, none is stored
  for (int i = 0; i < 3; ++i) {
    auto b = make_booking("async-" + std::to_string(i), BookingStatus::confirmed, {{"r", 1}});
    store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) {
      CHECK(r.error().message == locked);
      group.add(r);
    });
  }
  REQUIRE(group.wait(3));
  CHECK(group.failed == 3);
  auto resource = store->put_resource("r", 3);
  REQUIRE_FALSE(resource.has_value());
  CHECK(resource.error().message == locked);
  // Reads do not wait for the writer lock (WAL), and neither does opening an existing database.
  CHECK(store->load("before").value().has_value());
  CHECK(SqliteStore::open(path, options).has_value());
  CHECK_FALSE(store->load("during").value().has_value());

  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  REQUIRE(commit(*store, make_booking("after", BookingStatus::confirmed, {{"r", 1}})));
  CHECK(store->load("after").value().has_value());
  CHECK_FALSE(store->load("during").value().has_value());  // the failed groups stored nothing
  CHECK_FALSE(store->load("async-0").value().has_value());
}

TEST_CASE("opening a new database that another connection holds locked fails after busy_timeout") {
  temp_dir dir;
  const auto path = dir.file("db");
  raw_db other(path);  // a fresh file, still in rollback-journal mode: a lock blocks readers too
  REQUIRE(other.exec("BEGIN EXCLUSIVE") == SQLITE_OK);
  SqliteOptions options;
  options.busy_timeout = milliseconds(50);
  auto store = SqliteStore::open(path, options);
  REQUIRE_FALSE(store.has_value());
  CHECK(store.error().is(errc::store_failed));
  CHECK(store.error().message == "SQLite database '" + path +
                                     "': reading its header: database is locked (another connection holds it "
                                     "longer than busy_timeout, 50 ms)");
  REQUIRE(other.exec("COMMIT") == SQLITE_OK);
  CHECK(SqliteStore::open(path, options).has_value());
}

TEST_CASE("both sync modes use WAL and keep what they committed across a reopen") {
  for (auto sync : {SqliteSync::normal, SqliteSync::full}) {
    CAPTURE(static_cast<int>(sync));
    temp_dir dir;
    const auto path = dir.file("db");
    SqliteOptions options;
    options.sync = sync;
    {
      auto store = open_ok(path, options);
      CHECK(store->sync() == sync);
      REQUIRE(commit(*store, make_booking("b1", BookingStatus::confirmed, {{"r", 1}})));
      raw_db other(path);
      CHECK(other.text("PRAGMA journal_mode") == "wal");
    }
    auto store = open_ok(path, options);
    auto loaded = store->load("b1").value();
    REQUIRE(loaded.has_value());
    CHECK(loaded->status == BookingStatus::confirmed);
  }
}

TEST_CASE("destroying the store stores everything queued and runs every callback") {
  temp_dir dir;
  const auto path = dir.file("db");
  completion all;
  {
    auto store = open_ok(path);
    for (int i = 0; i < 500; ++i) {
      auto b = make_booking("b" + std::to_string(i), BookingStatus::confirmed, {{"r", 1}});
      store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) { all.add(r); });
    }
  }  // no wait before the destructor
  CHECK(all.done == 500);
  CHECK(all.failed == 0);
  auto store = open_ok(path);
  CHECK(store->recover(at_ms(0)).value().resources.at(0).confirmed == 500);
}

TEST_CASE("commit and put_resource from a commit callback fail instead of waiting for themselves") {
  temp_dir dir;
  auto store = open_ok(dir.file("db"));
  std::optional<result<void>> inner_commit, inner_resource;
  completion all;
  auto b = make_booking("b1", BookingStatus::confirmed, {{"r", 1}});
  store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) {
    inner_commit = commit(*store, make_booking("b2", BookingStatus::confirmed, {{"r", 1}}));
    inner_resource = store->put_resource("r", 1);
    all.add(r);
  });
  REQUIRE(all.wait(1));
  REQUIRE(inner_commit.has_value());
  REQUIRE_FALSE(inner_commit->has_value());
  CHECK(inner_commit->error().message ==
        "SQLite database '" + dir.file("db") +
            "': commit() called from a commit callback would wait for itself");
  REQUIRE_FALSE(inner_resource->has_value());
  CHECK(inner_resource->error().is(errc::store_failed));
}

TEST_CASE(
    "the last reference dropped in a commit callback: the store's threads finish and close on their own") {
  temp_dir dir;
  const auto path = dir.file("db");
  completion all;
  {
    auto store = open_ok(path);
    auto b = make_booking("b1", BookingStatus::confirmed, {{"r", 1}});
    auto* raw = store.get();
    // The callback owns the store; dropping the callback after it ran destroys the store on the
    // completion thread.
    raw->commit_async(StateChange{b, {}, {}},
                      [keep = std::move(store), &all](result<void> r) { all.add(r); });
  }
  REQUIRE(all.wait(1));
  CHECK(all.failed == 0);
  // The last connection closing checkpoints and removes the -wal file.
  CHECK(wait_for([&] { return !fs::exists(path + "-wal"); }));
  auto store = open_ok(path);
  CHECK(store->load("b1").value().has_value());
}
