// PostgresStore on a PostgreSQL server of the test's own (tests/postgres_server.hpp): the
// BookingStore contract, the schema and its upgrade, capacity enforced by the database across
// two stores (as two processes would hold them), the database going away and coming back, and
// the engine over it end to end.
#include <pushbook/booking_engine.hpp>
#include <pushbook/postgres_store.hpp>

#include "postgres_server.hpp"
#include "refusing_bus.hpp"
#include "requests.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <poll.h>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::eventually;
using pushbook::test::PostgresServer;

namespace {

wall_clock::time_point at_ms(std::int64_t ms) {
  return wall_clock::time_point(std::chrono::milliseconds(ms));
}

Booking make_booking(std::string id, BookingStatus status, std::vector<BookingLine> lines,
                     std::string key = {}, std::int64_t created_ms = 1700000000000, std::string user = "u1") {
  Booking b;
  b.id = std::move(id);
  b.user = std::move(user);
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

// Stores `b` with `status` as its next version.
result<void> advance(BookingStore& store, Booking& b, BookingStatus status) {
  b.status = status;
  ++b.version;
  if (status == BookingStatus::held) b.expires_at = b.updated_at + 60s;
  if (status != BookingStatus::held) b.expires_at.reset();
  return commit(store, b);
}

PostgresOptions quick_options() {
  PostgresOptions o;
  o.statement_timeout = 2000ms;
  o.connect_timeout = 1000ms;
  return o;
}

std::shared_ptr<PostgresStore> open_ok(PostgresServer& pg, PostgresOptions options = quick_options()) {
  auto store = PostgresStore::open(pg.conninfo(), options);
  if (!store) FAIL(store.error().message);
  return *store;
}

// "capacity reserved confirmed" of a resource row.
std::string counters(PostgresServer& pg, const std::string& id) {
  return pg.query(
      "SELECT capacity || ' ' || reserved || ' ' || confirmed FROM pushbook_resources WHERE id = '" + id +
      "'");
}

// "reserved confirmed" of a resource recounted from the booking rows.
std::string recount(PostgresServer& pg, const std::string& id) {
  return pg.query(
      "SELECT coalesce(sum(l.quantity) FILTER (WHERE b.status = 'held'), 0) || ' ' || "
      "coalesce(sum(l.quantity) FILTER (WHERE b.status = 'confirmed'), 0) "
      "FROM pushbook_bookings b, json_to_recordset(b.lines) AS l(resource text, quantity bigint) "
      "WHERE l.resource = '" +
      id + "'");
}

// Counts finished callbacks so a test can wait for all of them.
struct completion {
  std::mutex mutex;
  std::condition_variable cv;
  std::size_t done = 0;
  std::map<std::string, std::size_t> errors;  // by errc name
  void add(const result<void>& r) {
    std::lock_guard lock(mutex);
    ++done;
    if (!r) ++errors[r.error().code.message()];
    cv.notify_all();
  }
  bool wait(std::size_t n) {
    std::unique_lock lock(mutex);
    return cv.wait_for(lock, 60s, [&] { return done >= n; });
  }
};

// The schema of version 1 exactly as that version created it: what a database left by it looks
// like, frozen here on purpose (the store's own copy may only ever be upgraded from).
constexpr const char* schema_v1_as_released = R"sql(
CREATE TABLE pushbook_schema_version (version integer NOT NULL);
INSERT INTO pushbook_schema_version VALUES (1);
CREATE TABLE pushbook_resources (id text PRIMARY KEY, capacity bigint NOT NULL CHECK (capacity >= 0));
CREATE TABLE pushbook_bookings (
  seq bigserial NOT NULL, id text PRIMARY KEY, user_id text NOT NULL, status text NOT NULL,
  version bigint NOT NULL, idem_key text, fingerprint text, created_at timestamptz NOT NULL,
  updated_at timestamptz NOT NULL, expires_at timestamptz, lines json NOT NULL, booking json NOT NULL,
  UNIQUE (user_id, idem_key));
CREATE INDEX pushbook_bookings_live ON pushbook_bookings (seq) WHERE status IN ('processing', 'held');
CREATE INDEX pushbook_bookings_keys ON pushbook_bookings (created_at) WHERE idem_key IS NOT NULL;
)sql";

}  // namespace

TEST_CASE("commit then load gives back the booking; a missing one is nullopt") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("room-1", 5));
  auto b = make_booking("b1", BookingStatus::processing, {{"room-1", 2}}, "key-1");
  b.metadata = boost::json::object{{"note", "window seat"}, {"n", 3}};
  REQUIRE(commit(*store, b, "fp-1"));
  auto loaded = store->load("b1").value();
  REQUIRE(loaded);
  CHECK(loaded->id == "b1");
  CHECK(loaded->user == "u1");
  CHECK(loaded->status == BookingStatus::processing);
  CHECK(loaded->lines.size() == 1);
  CHECK(loaded->lines[0].resource == "room-1");
  CHECK(loaded->lines[0].quantity == 2);
  CHECK(loaded->idempotency_key == "key-1");
  CHECK(loaded->metadata == b.metadata);
  CHECK(loaded->created_at == b.created_at);
  CHECK(store->load("nope").value() == std::nullopt);
  CHECK(pg.query("SELECT version FROM pushbook_schema_version") == "5");
  CHECK(PostgresStore::schema_version() == 5);
}

TEST_CASE("the database keeps the counts: each status change moves units, in the same transaction") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("r", 10));
  auto a = make_booking("a", BookingStatus::processing, {{"r", 3}});
  REQUIRE(commit(*store, a));
  CHECK(counters(pg, "r") == "10 0 0");  // processing holds nothing
  REQUIRE(advance(*store, a, BookingStatus::held));
  CHECK(counters(pg, "r") == "10 3 0");
  REQUIRE(advance(*store, a, BookingStatus::held));  // the same status again (a retried commit)
  CHECK(counters(pg, "r") == "10 3 0");
  REQUIRE(advance(*store, a, BookingStatus::confirmed));
  CHECK(counters(pg, "r") == "10 0 3");
  REQUIRE(advance(*store, a, BookingStatus::cancelled));
  CHECK(counters(pg, "r") == "10 0 0");

  auto b = make_booking("b", BookingStatus::processing, {{"r", 4}});
  REQUIRE(commit(*store, b));
  REQUIRE(advance(*store, b, BookingStatus::confirmed));  // no hold: straight to confirmed
  auto c = make_booking("c", BookingStatus::processing, {{"r", 2}});
  REQUIRE(commit(*store, c));
  REQUIRE(advance(*store, c, BookingStatus::held));
  CHECK(counters(pg, "r") == "10 2 4");
  for (auto status : {BookingStatus::released, BookingStatus::expired, BookingStatus::cancelled}) {
    auto h = make_booking(std::string("h-") + to_string(status), BookingStatus::processing, {{"r", 1}});
    REQUIRE(commit(*store, h));
    REQUIRE(advance(*store, h, BookingStatus::held));
    CHECK(counters(pg, "r") == "10 3 4");
    REQUIRE(advance(*store, h, status));
    CHECK(counters(pg, "r") == "10 2 4");
  }
  auto x = make_booking("x", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*store, x));
  REQUIRE(advance(*store, x, BookingStatus::rejected));
  CHECK(counters(pg, "r") == "10 2 4");
  CHECK(recount(pg, "r") == "2 4");
}

TEST_CASE("resource ids with quotes, backslashes, commas and braces keep their counts") {
  PostgresServer pg;
  auto store = open_ok(pg);
  const std::string odd = "we\"ird\\,{id} x";
  REQUIRE(store->put_resource(odd, 4));
  REQUIRE(store->put_resource("plain", 4));
  auto b = make_booking("b", BookingStatus::processing, {{"plain", 1}, {odd, 2}, {odd, 1}});
  REQUIRE(commit(*store, b));
  REQUIRE(advance(*store, b, BookingStatus::held));
  auto state = store->recover(at_ms(0)).value();
  REQUIRE(state.resources.size() == 2);
  CHECK(state.resources[0].id == "plain");
  CHECK(state.resources[0].reserved == 1);
  CHECK(state.resources[1].id == odd);
  CHECK(state.resources[1].reserved == 3);
  CHECK(store->load("b").value()->lines[1].resource == odd);
}

TEST_CASE("a version that does not fit fails with sold_out, names the resource, and stores nothing") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("a", 5));
  REQUIRE(store->put_resource("b", 1));
  auto first = make_booking("first", BookingStatus::processing, {{"b", 1}});
  REQUIRE(commit(*store, first));
  REQUIRE(advance(*store, first, BookingStatus::confirmed));
  // Two lines: "a" fits, "b" does not; neither is taken.
  auto two = make_booking("two", BookingStatus::processing, {{"a", 2}, {"b", 1}});
  REQUIRE(commit(*store, two));
  auto r = advance(*store, two, BookingStatus::held);
  REQUIRE(!r);
  CHECK(r.error().is(errc::sold_out));
  CHECK(r.error().message.find("resource 'b' has 0 units free, the booking needs 1") != std::string::npos);
  CHECK(counters(pg, "a") == "5 0 0");
  CHECK(counters(pg, "b") == "1 0 1");
  CHECK(store->load("two").value()->status == BookingStatus::processing);  // the stored version stays
  // Lines of one resource add up; a resource without a row has nothing free.
  auto same = make_booking("same", BookingStatus::processing, {{"a", 3}, {"a", 3}});
  REQUIRE(commit(*store, same));
  CHECK(advance(*store, same, BookingStatus::confirmed).error().is(errc::sold_out));
  auto ghost = make_booking("ghost", BookingStatus::processing, {{"nowhere", 1}});
  REQUIRE(commit(*store, ghost));
  CHECK(advance(*store, ghost, BookingStatus::held).error().is(errc::sold_out));
  // Capacity cannot drop below what the database says is in use.
  auto shrink = store->put_resource("b", 0);
  REQUIRE(!shrink);
  CHECK(shrink.error().is(errc::capacity_in_use));
  CHECK(shrink.error().message.find("1 units are reserved or confirmed") != std::string::npos);
  REQUIRE(store->put_resource("a", 2));
  CHECK(counters(pg, "a") == "2 0 0");
}

TEST_CASE("a refused change fails alone; the rest of its group is stored") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("r", 3));
  std::vector<Booking> bookings;
  for (int i = 0; i < 8; ++i) {
    bookings.push_back(make_booking("g" + std::to_string(i), BookingStatus::processing, {{"r", 1}}));
    REQUIRE(commit(*store, bookings.back()));
  }
  completion done;
  for (auto& b : bookings) {
    b.status = BookingStatus::confirmed;
    ++b.version;
    store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) { done.add(r); });
  }
  REQUIRE(done.wait(bookings.size()));
  CHECK(done.errors.size() == 1);
  CHECK(done.errors.begin()->first == make_error_code(errc::sold_out).message());
  CHECK(done.errors.begin()->second == 5);
  CHECK(counters(pg, "r") == "3 0 3");
  CHECK(recount(pg, "r") == "0 3");
  CHECK(pg.query("SELECT count(*) FROM pushbook_bookings WHERE status = 'confirmed'") == "3");
}

TEST_CASE("concurrent commits are grouped into few transactions") {
  PostgresServer pg;
  auto store = open_ok(pg);
  const auto before = store->transactions();
  completion done;
  std::vector<Booking> bookings;
  for (int i = 0; i < 500; ++i)
    bookings.push_back(make_booking("c" + std::to_string(i), BookingStatus::processing, {{"r", 1}}));
  for (const auto& b : bookings)
    store->commit_async(StateChange{b, {}, {}}, [&](result<void> r) { done.add(r); });
  REQUIRE(done.wait(bookings.size()));
  CHECK(done.errors.empty());
  const auto used = store->transactions() - before;
  MESSAGE(used << " transactions for 500 commits");
  CHECK(used < 250);
  CHECK(pg.query("SELECT count(*) FROM pushbook_bookings") == "500");
}

TEST_CASE("idempotency keys are unique per user in the database") {
  PostgresServer pg;
  auto one = open_ok(pg);
  auto two = open_ok(pg);  // another process's store
  REQUIRE(commit(*one, make_booking("k1", BookingStatus::processing, {{"r", 1}}, "key"), "fp"));
  auto again = commit(*two, make_booking("k2", BookingStatus::processing, {{"r", 1}}, "key"), "fp");
  REQUIRE(!again);
  CHECK(again.error().is(errc::idempotency_conflict));
  CHECK(again.error().message.find("already has booking 'k1' with idempotency key 'key'") !=
        std::string::npos);
  CHECK(two->load("k2").value() == std::nullopt);
  // Another user may use the same key; bookings without a key never conflict.
  REQUIRE(
      commit(*two, make_booking("k3", BookingStatus::processing, {{"r", 1}}, "key", 1700000000000, "u2")));
  REQUIRE(commit(*two, make_booking("n1", BookingStatus::processing, {{"r", 1}})));
  REQUIRE(commit(*two, make_booking("n2", BookingStatus::processing, {{"r", 1}})));
  // Later versions keep the key and its fingerprint.
  auto k1 = make_booking("k1", BookingStatus::processing, {{"r", 1}}, "key");
  k1.status = BookingStatus::rejected;
  ++k1.version;
  REQUIRE(commit(*one, k1));  // decided by the store that claimed it
  CHECK(pg.query("SELECT fingerprint FROM pushbook_bookings WHERE id = 'k1'") == "fp");
}

TEST_CASE("recover: the database's counts, processing in first-stored order, held, recent keys") {
  PostgresServer pg;
  // A process restarted under the same node id: its undecided bookings are its own at once.
  auto options = quick_options();
  options.node_id = "node-a";
  {
    auto store = open_ok(pg, options);
    REQUIRE(store->put_resource("r", 10));
    REQUIRE(store->put_resource("s", 2));
    auto c = make_booking("c", BookingStatus::processing, {{"r", 2}});
    REQUIRE(commit(*store, c));
    REQUIRE(advance(*store, c, BookingStatus::confirmed));
    auto h = make_booking("h", BookingStatus::processing, {{"r", 1}, {"s", 1}});
    REQUIRE(commit(*store, h));
    REQUIRE(advance(*store, h, BookingStatus::held));
    REQUIRE(commit(*store, make_booking("p2", BookingStatus::processing, {{"s", 1}}, "old", 1600000000000),
                   "f0"));
    REQUIRE(commit(*store, make_booking("p1", BookingStatus::processing, {{"s", 1}}, "new", 1700000000000),
                   "f1"));
    auto p2 = make_booking("p2", BookingStatus::processing, {{"s", 1}}, "old", 1600000000000);
    p2.version = 2;  // a new version keeps its first-stored place
    REQUIRE(commit(*store, p2));
  }
  // node-a's store closed and handed its undecided bookings over (their claims lapsed at once):
  // another node's recovery claims them, and hands them back when it closes too.
  CHECK(open_ok(pg)->recover(at_ms(1650000000000)).value().processing.size() == 2);
  auto store = open_ok(pg, options);
  auto state = store->recover(at_ms(1650000000000)).value();
  REQUIRE(state.resources.size() == 2);
  CHECK(state.resources[0].id == "r");
  CHECK(state.resources[0].capacity == 10);
  CHECK(state.resources[0].reserved == 1);
  CHECK(state.resources[0].confirmed == 2);
  CHECK(state.resources[1].id == "s");
  CHECK(state.resources[1].reserved == 1);
  REQUIRE(state.processing.size() == 2);
  CHECK(state.processing[0].id == "p2");
  CHECK(state.processing[0].version == 2);
  CHECK(state.processing[1].id == "p1");
  REQUIRE(state.held.size() == 1);
  CHECK(state.held[0].id == "h");
  REQUIRE(state.keys.size() == 1);
  CHECK(state.keys[0].key == "new");
  CHECK(state.keys[0].fingerprint == "f1");
  CHECK(state.keys[0].booking_id == "p1");
  CHECK(state.keys[0].created_at == at_ms(1700000000000));
  CHECK(recount(pg, "r") == "1 2");
}

TEST_CASE("schema: a version 1 database is upgraded with its counts; a newer one is refused") {
  PostgresServer pg;
  REQUIRE(pg.query(schema_v1_as_released).empty());
  REQUIRE(pg.error().empty());
  REQUIRE(
      pg.query("INSERT INTO pushbook_resources VALUES ('r', 5); "
               "INSERT INTO pushbook_bookings (id, user_id, status, version, created_at, updated_at, lines, "
               "booking) VALUES "
               "('h', 'u1', 'held', 2, now(), now(), '[{\"resource\":\"r\",\"quantity\":2}]', '{}'), "
               "('c', 'u1', 'confirmed', 2, now(), now(), '[{\"resource\":\"r\",\"quantity\":1}]', '{}'), "
               "('x', 'u1', 'cancelled', 3, now(), now(), '[{\"resource\":\"r\",\"quantity\":1}]', '{}')")
          .empty());
  REQUIRE(pg.error().empty());
  {
    auto store = open_ok(pg);
    CHECK(pg.query("SELECT version FROM pushbook_schema_version") == "5");
    CHECK(counters(pg, "r") == "5 2 1");
    // Schema 5: numbered from the upgrade's time in ms, above any seq a bus numbered the topic with.
    CHECK(std::stoll(pg.query("SELECT version FROM pushbook_resources WHERE id = 'r'")) > 1'600'000'000'000);
    // Bookings from before the outbox count as published: nothing to relay.
    CHECK(pg.query("SELECT count(*) FROM pushbook_outbox") == "0");
    // The upgraded database enforces capacity like a new one.
    auto big = make_booking("big", BookingStatus::processing, {{"r", 3}});
    REQUIRE(commit(*store, big));
    CHECK(advance(*store, big, BookingStatus::confirmed).error().is(errc::sold_out));
    big.version = 1;
    big.lines[0].quantity = 2;
    REQUIRE(advance(*store, big, BookingStatus::confirmed));
    CHECK(counters(pg, "r") == "5 2 3");
  }
  // Two stores opening an up-to-date database change nothing.
  open_ok(pg);
  CHECK(pg.query("SELECT version FROM pushbook_schema_version") == "5");

  REQUIRE(pg.query("UPDATE pushbook_schema_version SET version = 9").empty());
  auto newer = PostgresStore::open(pg.conninfo(), quick_options());
  REQUIRE(!newer);
  CHECK(newer.error().is(errc::store_failed));
  CHECK(newer.error().message.find("database schema version 9 is newer than this pushbook (knows 5)") !=
        std::string::npos);
}

TEST_CASE("open: an unreachable server and a bad conninfo fail with a message") {
  PostgresServer pg;
  const auto info = pg.conninfo();
  pg.stop();
  const auto t0 = std::chrono::steady_clock::now();
  auto down = PostgresStore::open(info, quick_options());
  REQUIRE(!down);
  CHECK(down.error().is(errc::store_failed));
  CHECK(down.error().message.find("cannot connect") != std::string::npos);
  CHECK(std::chrono::steady_clock::now() - t0 < 3s);
  auto bad = PostgresStore::open("host=/tmp port=notaport= =", quick_options());
  REQUIRE(!bad);
  CHECK(bad.error().is(errc::bad_request));
  auto unknown = open_store("postgresql://127.0.0.1:1/x?nosuchoption=1");
  REQUIRE(!unknown);
  CHECK(!unknown.error().message.empty());
}

TEST_CASE("open_store takes a postgresql:// URI") {
  PostgresServer pg;
  auto store = open_store(pg.uri());
  if (!store) FAIL(store.error().message);
  REQUIRE((*store)->put_resource("r", 1));
  CHECK(counters(pg, "r") == "1 0 0");
}

TEST_CASE("the database stopped: commits and reads fail fast with store_failed, then work after a restart") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("r", 100));
  auto b = make_booking("b", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*store, b));
  REQUIRE(store->load("b").value());  // a reader is connected too
  CHECK(store->available());

  pg.stop();
  for (int i = 0; i < 3; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto c = commit(*store, make_booking("d" + std::to_string(i), BookingStatus::processing, {{"r", 1}}));
    const auto took = std::chrono::steady_clock::now() - t0;
    REQUIRE(!c);
    CHECK(c.error().is(errc::store_failed));
    CHECK(c.error().message.find("PostgreSQL database 'pushbook'") != std::string::npos);
    MESSAGE(c.error().message);
    CHECK(took < 2500ms);  // at most the statement timeout
    auto l = store->load("b");
    REQUIRE(!l);
    CHECK(l.error().is(errc::store_failed));
  }
  CHECK(!store->available());

  pg.start();
  // The store reconnects by itself (after reconnect_interval at most).
  REQUIRE(eventually([&] {
    return bool(commit(*store, make_booking("after", BookingStatus::processing, {{"r", 1}})));
  }));
  CHECK(store->available());
  REQUIRE(advance(*store, b, BookingStatus::held));
  CHECK(counters(pg, "r") == "100 1 0");
  REQUIRE(eventually([&] { return bool(store->load("after")); }));
  CHECK(store->load("d0").value() == std::nullopt);  // nothing of a failed commit was stored
}

TEST_CASE("the database crashes (SIGKILL) and recovers: what was committed is there, the store goes on") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("r", 10));
  auto b = make_booking("b", BookingStatus::processing, {{"r", 2}});
  REQUIRE(commit(*store, b));
  REQUIRE(advance(*store, b, BookingStatus::held));
  pg.kill();
  auto during = commit(*store, make_booking("during", BookingStatus::processing, {{"r", 1}}));
  REQUIRE(!during);
  CHECK(during.error().is(errc::store_failed));
  pg.start();  // crash recovery from the WAL
  std::string last_error;
  REQUIRE_MESSAGE(eventually([&] {
                    auto next = b;  // each attempt stores version 3: a failed one stored nothing
                    auto r = advance(*store, next, BookingStatus::confirmed);
                    if (!r) last_error = r.error().message;
                    return bool(r);
                  }),
                  last_error);
  CHECK(counters(pg, "r") == "10 0 2");
  CHECK(recount(pg, "r") == "0 2");
  CHECK(store->load("during").value() == std::nullopt);
}

TEST_CASE("two stores, competing threads: the database never gives out more than capacity") {
  // PUSHBOOK_SEED replays a run (the thread interleaving still differs: the race is real).
  const char* seed_env = std::getenv("PUSHBOOK_SEED");
  const auto seed =
      seed_env ? static_cast<unsigned>(std::strtoul(seed_env, nullptr, 10)) : std::random_device{}();
  std::printf("postgres_store_test: seed %u (PUSHBOOK_SEED=%u to replay)\n", seed, seed);
  PostgresServer pg;
  auto one = open_ok(pg);
  auto two = open_ok(pg);  // as another process: its own connections
  const std::vector<std::string> resources = {"r0", "r1", "r2"};
  for (const auto& r : resources) REQUIRE(one->put_resource(r, 40));
  std::atomic<int> confirmed{0}, held{0}, sold_out{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed + static_cast<unsigned>(t));
      auto& store = t % 2 ? *two : *one;
      std::vector<Booking> holds;
      for (int i = 0; i < 60; ++i) {
        std::vector<BookingLine> lines;
        const auto n = 1 + rng() % 2;
        for (unsigned k = 0; k < n; ++k)
          lines.push_back({resources[rng() % resources.size()], static_cast<std::uint32_t>(1 + rng() % 3)});
        auto b =
            make_booking("t" + std::to_string(t) + "-" + std::to_string(i), BookingStatus::processing, lines);
        if (!commit(store, b)) {
          ++other;
          continue;
        }
        const auto to = rng() % 2 ? BookingStatus::held : BookingStatus::confirmed;
        auto r = advance(store, b, to);
        if (r) {
          (to == BookingStatus::held ? held : confirmed)++;
          if (to == BookingStatus::held) holds.push_back(b);
        } else if (r.error().is(errc::sold_out)) {
          ++sold_out;
          b.version = 1;  // still processing in the store
          if (!advance(store, b, BookingStatus::rejected)) ++other;
        } else {
          ++other;
        }
        // Now and then a hold ends, so that units come back and the race goes on.
        if (!holds.empty() && rng() % 3 == 0) {
          auto h = holds.back();
          holds.pop_back();
          const auto end = rng() % 2 ? BookingStatus::released : BookingStatus::confirmed;
          if (!advance(store, h, end)) ++other;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  MESSAGE("confirmed " << confirmed.load() << ", held " << held.load() << ", sold out " << sold_out.load());
  CHECK(other == 0);
  CHECK(sold_out > 0);  // the race was real: 6 threads * 60 bookings ask far more than 60 units
  for (const auto& r : resources) {
    CAPTURE(r);
    const auto c = counters(pg, r);
    CHECK(c.starts_with("40 "));
    CHECK(c.substr(3) == recount(pg, r));
    unsigned capacity = 0, reserved = 0, in_confirmed = 0;
    REQUIRE(std::sscanf(c.c_str(), "%u %u %u", &capacity, &reserved, &in_confirmed) == 3);
    CHECK(reserved + in_confirmed <= capacity);
  }
}

TEST_CASE("multi-line bookings in opposite orders from two stores never deadlock") {
  PostgresServer pg;
  auto one = open_ok(pg);
  auto two = open_ok(pg);
  REQUIRE(one->put_resource("a", 100000));
  REQUIRE(one->put_resource("b", 100000));
  std::atomic<int> failures{0};
  std::mutex error_mutex;
  std::string last_error;
  auto run = [&](PostgresStore& store, const std::string& prefix, std::vector<BookingLine> lines) {
    for (int i = 0; i < 150; ++i) {
      auto b = make_booking(prefix + std::to_string(i), BookingStatus::processing, lines);
      auto r = commit(store, b);
      if (r) r = advance(store, b, BookingStatus::held);
      if (r) r = advance(store, b, BookingStatus::confirmed);
      if (!r) {
        ++failures;
        std::lock_guard lock(error_mutex);
        last_error = r.error().message;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back(run, std::ref(*one), "ab" + std::to_string(t) + "-",
                         std::vector<BookingLine>{{"a", 1}, {"b", 1}});
    threads.emplace_back(run, std::ref(*two), "ba" + std::to_string(t) + "-",
                         std::vector<BookingLine>{{"b", 1}, {"a", 1}});
  }
  for (auto& t : threads) t.join();
  CHECK_MESSAGE(failures == 0, last_error);
  CHECK(counters(pg, "a") == "100000 0 600");
  CHECK(counters(pg, "b") == "100000 0 600");
}

TEST_CASE("an engine over PostgresStore: book, decide, and recover after a restart") {
  PostgresServer pg;
  auto bus = std::make_shared<LocalBus>();
  std::string held_id, confirmed_id;
  {
    EngineOptions o;
    o.store = open_ok(pg);
    BookingEngine engine(bus, o);
    REQUIRE(engine.add_resource("room", 3));
    auto held_request = test::one("u1", "room", 1);
    held_request.hold_for = 10min;
    held_id = engine.submit(held_request).value().booking_id;
    confirmed_id = engine.submit(test::one("u2", "room", 2, "k2")).value().booking_id;
    REQUIRE(eventually([&] { return engine.stats().in_flight == 0; }));
    CHECK(engine.get(held_id).value().status == BookingStatus::held);
    CHECK(engine.get(confirmed_id).value().status == BookingStatus::confirmed);
    // The engine's memory says sold out; so does the database.
    auto full = engine.submit(test::one("u3", "room", 1)).value().booking_id;
    REQUIRE(eventually([&] { return engine.get(full).value().status == BookingStatus::rejected; }));
    CHECK(counters(pg, "room") == "3 1 2");
    engine.shutdown();
  }
  // A new process over the same database: counts, the hold and the key come back.
  EngineOptions o;
  o.store = open_ok(pg);
  BookingEngine engine(bus, o);
  auto room = engine.resource("room").value();
  CHECK(room.capacity == 3);
  CHECK(room.reserved == 1);
  CHECK(room.confirmed == 2);
  CHECK(engine.submit(test::one("u2", "room", 2, "k2")).value().booking_id == confirmed_id);
  CHECK(engine.confirm(held_id).value().status == BookingStatus::confirmed);
  CHECK(counters(pg, "room") == "3 0 3");
  CHECK(recount(pg, "room") == "0 3");
}

TEST_CASE(
    "two engines on one database: the database's refusal becomes a sold_out rejection; resource events "
    "carry the database's counts") {
  PostgresServer pg;
  auto bus = std::make_shared<LocalBus>();
  // Every resource event: seq, reserved + confirmed, capacity.
  std::mutex seen_mutex;
  std::vector<std::array<std::int64_t, 3>> seen;
  auto watch = bus->subscribe("resource/seat",
                              [&](const Delivery& d) {
                                if (d.kind != Delivery::Kind::event) return;
                                const auto& o = d.event->data().as_object();
                                std::lock_guard lock(seen_mutex);
                                seen.push_back({static_cast<std::int64_t>(d.event->seq()),
                                                o.at("reserved").as_int64() + o.at("confirmed").as_int64(),
                                                o.at("capacity").as_int64()});
                              })
                   .value();
  EngineOptions o1, o2;
  o1.store = open_ok(pg);
  o2.store = open_ok(pg);
  BookingEngine first(bus, o1);
  REQUIRE(first.add_resource("seat", 5));
  BookingEngine second(bus, o2);  // recovers capacity 5, nothing taken yet
  // Each engine's memory thinks all 5 seats are free; together they ask for 8.
  std::vector<std::string> ids;
  for (int i = 0; i < 4; ++i) {
    ids.push_back(first.submit(test::one("a" + std::to_string(i), "seat", 1)).value().booking_id);
    ids.push_back(second.submit(test::one("b" + std::to_string(i), "seat", 1)).value().booking_id);
  }
  REQUIRE(eventually([&] { return first.stats().in_flight == 0 && second.stats().in_flight == 0; }));
  int confirmed = 0, rejected = 0;
  for (const auto& id : ids) {
    const auto b = first.get(id).value();
    if (b.status == BookingStatus::confirmed) ++confirmed;
    if (b.status == BookingStatus::rejected) {
      ++rejected;
      CHECK(b.reason == RejectReason::sold_out);
    }
  }
  CHECK(confirmed == 5);
  CHECK(rejected == 3);
  CHECK(counters(pg, "seat") == "5 0 5");
  // Each engine's memory freed the units it had set aside for its refused bookings.
  CHECK(first.resource("seat").value().confirmed + second.resource("seat").value().confirmed == 5);
  // Neither engine's memory knows all 5 confirmed seats, but the events carry what the database
  // holds, numbered by its row version: the last one is the database's row, no event ever showed
  // more than capacity, and seqs only grow (a late, older count from the other engine is dropped).
  const auto version = std::stoll(pg.query("SELECT version FROM pushbook_resources WHERE id = 'seat'"));
  REQUIRE(eventually([&] {
    auto last = bus->last("resource/seat");
    return last && static_cast<std::int64_t>(last->seq()) == version;
  }));
  CHECK(bus->last("resource/seat")->data().at("confirmed").as_int64() == 5);
  CHECK(bus->last("resource/seat")->data().at("available").as_int64() == 0);
  std::lock_guard lock(seen_mutex);
  REQUIRE(!seen.empty());
  for (std::size_t i = 0; i < seen.size(); ++i) {
    CAPTURE(i);
    CHECK(seen[i][1] <= seen[i][2]);
    if (i > 0) CHECK(seen[i][0] > seen[i - 1][0]);
  }
}

TEST_CASE(
    "on_resource_counts: each transaction reports the counts it left, numbered; a refusal moves nothing") {
  PostgresServer pg;
  auto store = open_ok(pg);
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<ResourceState> reported;
  CHECK(store->on_resource_counts([&](std::vector<ResourceState> counts) {
    std::lock_guard lock(mutex);
    for (auto& r : counts) reported.push_back(std::move(r));
    cv.notify_all();
  }));
  auto wait_for = [&](std::size_t n) {
    std::unique_lock lock(mutex);
    return cv.wait_for(lock, 10s, [&] { return reported.size() >= n; });
  };
  REQUIRE(store->put_resource("r", 3));
  REQUIRE(wait_for(1));
  auto b = make_booking("b", BookingStatus::processing, {{"r", 2}});
  REQUIRE(commit(*store, b));
  REQUIRE(advance(*store, b, BookingStatus::confirmed));
  REQUIRE(wait_for(2));
  auto c = make_booking("c", BookingStatus::processing, {{"r", 2}});
  REQUIRE(commit(*store, c));
  CHECK(advance(*store, c, BookingStatus::confirmed).error().is(errc::sold_out));
  REQUIRE(store->put_resource("r", 4));
  REQUIRE(wait_for(4));
  std::unique_lock lock(mutex);
  REQUIRE(reported.size() == 4);
  CHECK(reported[0].id == "r");
  CHECK(reported[0].capacity == 3);
  const auto base = reported[0].version;  // the creation time in ms, counted up by its transaction
  CHECK(base > 1'600'000'000'000);
  CHECK(reported[1].confirmed == 2);
  CHECK(reported[1].version == base + 1);
  // The refused version changed nothing: the same counts again (under a new number: a group's
  // transaction numbers each resource it locked).
  CHECK(reported[2].confirmed == 2);
  CHECK(reported[2].version == base + 2);
  CHECK(reported[3].capacity == 4);
  CHECK(reported[3].version == base + 3);
  lock.unlock();  // a call in progress would wait for it, and clearing waits for that call
  // Cleared: no more calls.
  CHECK(store->on_resource_counts(nullptr));
  lock.lock();
  REQUIRE(store->put_resource("r", 5));
  CHECK(reported.size() == 4);
}

namespace {
std::vector<std::string> ids_of(const std::vector<Booking>& bookings) {
  std::vector<std::string> ids;
  for (const auto& b : bookings) ids.push_back(b.id);
  return ids;
}
}  // namespace

TEST_CASE("the outbox: a stored version is unpublished until published() says so") {
  PostgresServer pg;
  auto store = open_ok(pg);
  REQUIRE(store->put_resource("r", 10));
  auto a = make_booking("a", BookingStatus::processing, {{"r", 1}});
  auto b = make_booking("b", BookingStatus::processing, {{"r", 1}});
  auto c = make_booking("c", BookingStatus::processing, {{"r", 1}}, {}, 1700000000000, "u\"2\\");
  REQUIRE(commit(*store, a));
  REQUIRE(commit(*store, b));
  REQUIRE(commit(*store, c));
  auto state = store->recover(at_ms(0)).value();
  CHECK(ids_of(state.unpublished) == std::vector<std::string>{"a", "b", "c"});
  // a's version 1 went out; b's version 2 is stored before the mark of its version 1 arrives
  // (the mark must not take the newer version's row with it).
  store->published("a", 1);
  REQUIRE(advance(*store, b, BookingStatus::confirmed));
  store->published("b", 1);
  // Marks alone are written too, without waiting for another commit.
  CHECK(eventually([&] { return pg.query("SELECT count(*) FROM pushbook_outbox") == "2"; }));
  state = store->recover(at_ms(0)).value();
  CHECK(ids_of(state.unpublished) == std::vector<std::string>{"b", "c"});
  REQUIRE(state.unpublished.size() == 2);
  CHECK(state.unpublished[0].version == 2);
  CHECK(state.unpublished[0].status == BookingStatus::confirmed);
  CHECK(state.unpublished[1].user == "u\"2\\");
  store->published("b", 2);
  store->published("c", 1);
  store->published("nobody", 7);  // a booking the store does not have: nothing happens
  CHECK(eventually([&] { return pg.query("SELECT count(*) FROM pushbook_outbox") == "0"; }));
  // A refused version (sold out) puts nothing in the outbox.
  REQUIRE(store->put_resource("small", 1));
  auto big = make_booking("big", BookingStatus::processing, {{"small", 2}});
  REQUIRE(commit(*store, big));
  store->published("big", 1);
  CHECK(advance(*store, big, BookingStatus::confirmed).error().is(errc::sold_out));
  CHECK(eventually([&] { return pg.query("SELECT count(*) FROM pushbook_outbox") == "0"; }));
}

TEST_CASE(
    "an engine dies between commit and publish: the next engine on the database relays each version once") {
  PostgresServer pg;
  // The same process slot restarted (a stable node id): what it left unpublished is relayed at
  // its start. (A live process's leftovers wait for the lease, as it may be publishing them; one
  // that closed handed them over, so any node's recovery has them.)
  auto options = quick_options();
  options.node_id = "slot-1";
  std::vector<std::string> ids;
  {
    EngineOptions o;
    o.store = open_ok(pg, options);
    BookingEngine engine(std::make_shared<test::RefusingBus>(), o);
    REQUIRE(engine.add_resource("r", 10));
    for (int i = 0; i < 4; ++i)
      ids.push_back(engine.submit(test::one("u" + std::to_string(i % 2), "r", 1)).value().booking_id);
    for (const auto& id : ids)
      REQUIRE(eventually([&] { return engine.get(id).value().status == BookingStatus::confirmed; }));
    CHECK(engine.stats().publish_failures > 0);
  }
  CHECK(pg.query("SELECT count(*) FROM pushbook_outbox") == "4");
  CHECK(pg.query("SELECT count(*) FROM pushbook_outbox WHERE stored_at < now() - interval '1 year'") ==
        "4");                                                             // handed over at close
  CHECK(open_ok(pg)->recover(at_ms(0)).value().unpublished.size() == 4);  // handed over at close
  // A recovery stamps the versions it hands to its engine: no takeover pass (of any store, the
  // next engine's own first one included) relays them again while they are being published.
  CHECK(pg.query("SELECT count(*) FROM pushbook_outbox WHERE stored_at > now() - interval '1 hour'") == "4");
  // The slot's next process, with a working bus: the latest version of each booking is published
  // once, with seq = version, before anything new is taken.
  auto bus = std::make_shared<LocalBus>();
  test::Collector<std::pair<std::string, std::uint64_t>> seen;
  auto sub = bus->subscribe("booking/*",
                            [&](const Delivery& d) {
                              if (d.event) seen.push({std::string(d.event->topic()), d.event->seq()});
                            })
                 .value();
  {
    EngineOptions o;
    o.store = open_ok(pg, options);
    BookingEngine engine(bus, o);
    CHECK(engine.stats().relayed == ids.size());
    auto events = seen.wait_for(ids.size());
    REQUIRE(events.size() == ids.size());
    std::set<std::string> topics;
    for (const auto& [topic, seq] : events) {
      CHECK(seq == 2);
      topics.insert(topic);
    }
    CHECK(topics.size() == ids.size());
    CHECK(eventually([&] { return pg.query("SELECT count(*) FROM pushbook_outbox") == "0"; }));
  }
  // A third start has nothing to relay; the bus got nothing twice.
  {
    EngineOptions o;
    o.store = open_ok(pg);
    BookingEngine engine(bus, o);
    CHECK(engine.stats().relayed == 0);
  }
  REQUIRE(bus->publish("booking/end", boost::json::object{{"status", "end"}}));
  CHECK(seen.wait_for(ids.size() + 1).size() == ids.size() + 1);
}

namespace {
// tests/postgres_node.cpp as a child process: its stdin and stdout are pipes to the test.
class NodeProcess {
 public:
  NodeProcess(const std::string& conninfo, int bookings, std::chrono::milliseconds lease,
              const char* mode = "hang") {
    int in[2], out[2];
    REQUIRE(::pipe(in) == 0);
    REQUIRE(::pipe(out) == 0);
    const std::string count = std::to_string(bookings), lease_ms = std::to_string(lease.count());
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      ::close(in[0]);
      ::close(in[1]);
      ::close(out[0]);
      ::close(out[1]);
      ::execl(PUSHBOOK_POSTGRES_NODE, PUSHBOOK_POSTGRES_NODE, conninfo.c_str(), count.c_str(),
              lease_ms.c_str(), mode, static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    to_ = in[1];
    from_ = out[0];
  }
  ~NodeProcess() {
    if (to_ >= 0) ::close(to_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    ::close(from_);
  }
  NodeProcess(const NodeProcess&) = delete;
  NodeProcess& operator=(const NodeProcess&) = delete;

  // The next line it prints, or nullopt when none comes within `timeout` (or it exited).
  std::optional<std::string> line(std::chrono::milliseconds timeout = 20s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (auto nl = buffer_.find('\n'); nl != std::string::npos) {
        auto l = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return l;
      }
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{from_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[4096];
      const auto n = ::read(from_, chunk, sizeof chunk);
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }
  // Reads lines up to "ready"; returns the ids it ACKed.
  std::vector<std::string> until_ready() {
    std::vector<std::string> acked;
    for (;;) {
      auto l = line();
      REQUIRE(l.has_value());
      if (*l == "ready") return acked;
      if (l->starts_with("acked ")) acked.push_back(l->substr(6));
    }
  }
  void send(const std::string& text) {
    REQUIRE(::write(to_, text.data(), text.size()) == static_cast<ssize_t>(text.size()));
  }
  void signal(int sig) { REQUIRE(::kill(pid_, sig) == 0); }
  void kill9() {
    signal(SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int to_ = -1, from_ = -1;
  std::string buffer_;
};

// An engine in this process that approves every booking and records which runs it saw.
struct TakingNode {
  std::shared_ptr<LocalBus> bus = std::make_shared<LocalBus>();
  std::mutex mutex;
  std::map<std::string, std::vector<std::uint32_t>> runs;       // booking id -> attempts seen
  test::Collector<std::pair<std::string, std::string>> events;  // (topic, status)
  Subscription sub;
  std::shared_ptr<PostgresStore> store;
  std::unique_ptr<BookingEngine> engine;

  TakingNode(PostgresServer& pg, std::chrono::milliseconds lease) {
    sub = bus->subscribe("booking/*",
                         [this](const Delivery& d) {
                           if (d.event)
                             events.push({std::string(d.event->topic()),
                                          std::string(d.event->data().at("status").as_string())});
                         })
              .value();
    PostgresOptions o = quick_options();
    o.lease = lease;
    store = open_ok(pg, o);
    EngineOptions eo;
    eo.store = store;
    eo.handler = [this](const Booking& b, Completion done) {
      {
        std::lock_guard lock(mutex);
        runs[b.id].push_back(b.attempt);
      }
      done(Decision::approved());
    };
    engine = std::make_unique<BookingEngine>(bus, eo);
  }
  // The statuses each booking/<id> event carried, in order.
  std::map<std::string, std::vector<std::string>> by_topic() {
    std::map<std::string, std::vector<std::string>> out;
    for (const auto& [topic, status] : events.items()) out[topic].push_back(status);
    return out;
  }
  // Whether every one of `ids` has had its decided event, and none twice.
  bool each_decided_once(const std::vector<std::string>& ids, const std::string& decided) {
    auto seen = by_topic();
    for (const auto& id : ids)
      if (std::count(seen["booking/" + id].begin(), seen["booking/" + id].end(), decided) != 1) return false;
    return true;
  }
};

std::string status_counts(PostgresServer& pg) {
  return pg.query(
      "SELECT string_agg(status || '=' || n, ' ' ORDER BY status) FROM "
      "(SELECT status, count(*) AS n FROM pushbook_bookings GROUP BY status) s");
}
}  // namespace

TEST_CASE(
    "kill -9 while handlers run: another process takes each booking over after the lease and decides it "
    "once") {
  PostgresServer pg;
  constexpr int n = 20;
  const auto lease = 2000ms;
  NodeProcess first(pg.conninfo(), n, lease);
  const auto ids = first.until_ready();  // every handler started, none answered
  REQUIRE(ids.size() == n);
  CHECK(status_counts(pg) == "processing=20");
  TakingNode second(pg, lease);  // starts while the first is alive: takes nothing at start
  CHECK(second.engine->stats().recovered == 0);
  first.kill9();
  const auto killed = std::chrono::steady_clock::now();
  REQUIRE(eventually([&] { return status_counts(pg) == "confirmed=20"; }, 30s));
  const auto took =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - killed);
  MESSAGE("decided by the second process " << took.count() << " ms after the kill (lease " << lease.count()
                                           << " ms)");
  CHECK(second.engine->stats().taken_over == n);
  {
    std::lock_guard lock(second.mutex);
    CHECK(second.runs.size() == n);
    for (const auto& id : ids) CHECK(second.runs[id] == std::vector<std::uint32_t>{2});  // once, the 2nd run
  }
  // Each decision published once (a "processing" version the first process had not marked
  // published may be relayed too); the counts agree with the rows.
  CHECK(eventually([&] { return second.each_decided_once(ids, "confirmed"); }));
  CHECK(counters(pg, "r") == "1000000 0 20");
  CHECK(recount(pg, "r") == "0 20");
}

TEST_CASE(
    "a process stopped past its lease: its bookings are decided by another, and its late decisions are "
    "refused") {
  // Late declines, and late approvals (the same status as the other's decision: refused all the
  // same, it is not a retry of this process's own commit).
  for (const std::string late : {"decline", "approve"}) {
    CAPTURE(late);
    PostgresServer pg;
    constexpr int n = 10;
    const auto lease = 2000ms;
    NodeProcess first(pg.conninfo(), n, lease);
    const auto ids = first.until_ready();
    REQUIRE(ids.size() == n);
    TakingNode second(pg, lease);
    first.signal(SIGSTOP);  // its lease thread stops renewing
    REQUIRE(eventually([&] { return status_counts(pg) == "confirmed=10"; }, 30s));
    first.signal(SIGCONT);
    first.send(late + "\n");  // its handlers answer now
    auto lost = first.line();
    REQUIRE(lost.has_value());
    CHECK(*lost == "lost 10");  // every late decision refused: nothing of them stored
    CHECK(status_counts(pg) == "confirmed=10");
    CHECK(pg.query("SELECT count(*) FROM pushbook_bookings WHERE written_by = '" + second.store->node_id() +
                   "'") == "10");
    CHECK(counters(pg, "r") == "1000000 0 10");
    CHECK(recount(pg, "r") == "0 10");
    std::lock_guard lock(second.mutex);
    for (const auto& id : ids) CHECK(second.runs[id] == std::vector<std::uint32_t>{2});
  }
}

TEST_CASE("a decided booking is never decided again: a stale version is refused with invalid_transition") {
  PostgresServer pg;
  auto one = open_ok(pg);
  auto two = open_ok(pg);
  REQUIRE(one->put_resource("r", 5));
  auto b = make_booking("b", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*one, b));  // claimed by `one`
  auto other = b;
  // Another store may not decide it while `one` holds the claim.
  auto refused = advance(*two, other, BookingStatus::confirmed);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().is(errc::invalid_transition));
  CHECK(refused.error().message.find("is being decided by another process (node '" + one->node_id() + "')") !=
        std::string::npos);
  auto decided = b;
  REQUIRE(advance(*one, decided, BookingStatus::confirmed));
  // The same version again (a commit retried after an unknown outcome) is fine; version 2 with
  // another status is not: it does not follow the stored one.
  auto again = b;
  REQUIRE(advance(*one, again, BookingStatus::confirmed));
  auto late = b;
  auto stale = advance(*one, late, BookingStatus::rejected);
  REQUIRE_FALSE(stale);
  CHECK(stale.error().is(errc::invalid_transition));
  CHECK(stale.error().message.find("version 2 is stored as confirmed") != std::string::npos);
  CHECK(counters(pg, "r") == "5 0 1");
}

TEST_CASE(
    "a process dies between commit and publish: a live process relays its versions after the lease, once") {
  PostgresServer pg;
  constexpr int n = 12;
  const auto lease = 2000ms;
  TakingNode live(pg, lease);  // up before and after
  NodeProcess first(pg.conninfo(), n, lease, "unpublished");
  const auto ids = first.until_ready();  // all confirmed, nothing of them published
  REQUIRE(ids.size() == n);
  first.kill9();
  const auto killed = std::chrono::steady_clock::now();
  // The live process relays each booking's latest version (confirmed, seq 2) once, and the
  // outbox empties.
  REQUIRE(eventually([&] { return live.each_decided_once(ids, "confirmed"); }, 30s));
  MESSAGE("relayed " << std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - killed)
                            .count()
                     << " ms after the kill (lease " << lease.count() << " ms)");
  CHECK(eventually([&] { return pg.query("SELECT count(*) FROM pushbook_outbox") == "0"; }));
  CHECK(live.engine->stats().relayed == n);
  CHECK(live.engine->stats().taken_over == 0);  // nothing to decide
  {
    std::lock_guard lock(live.mutex);
    CHECK(live.runs.empty());
  }
  // Nothing more comes: one event per booking.
  REQUIRE(live.bus->publish("booking/end", boost::json::object{{"status", "end"}}));
  CHECK(live.events.wait_for(n + 1).size() == n + 1);
  auto seen = live.by_topic();
  for (const auto& id : ids) CHECK(seen["booking/" + id] == std::vector<std::string>{"confirmed"});
}

TEST_CASE(
    "the same key sent to two processes at once gives one booking; another body is a conflict on both") {
  PostgresServer pg;
  auto bus = std::make_shared<LocalBus>();
  EngineOptions o1, o2;
  o1.store = open_ok(pg);
  o2.store = open_ok(pg);
  BookingEngine first(bus, o1);
  REQUIRE(first.add_resource("r", 100));
  BookingEngine second(bus, o2);
  constexpr int rounds = 20;
  for (int round = 0; round < rounds; ++round) {
    const auto request = test::one("u", "r", 1, "key-" + std::to_string(round));
    std::optional<result<Ack>> a, b;
    std::thread racer([&] { a = first.submit(request); });
    b = second.submit(request);
    racer.join();
    REQUIRE(a->has_value());
    REQUIRE(b->has_value());
    CHECK((*a)->booking_id == (*b)->booking_id);
    CHECK((*a)->replayed != (*b)->replayed);  // one stored it, the other answers with it
  }
  CHECK(pg.query("SELECT count(*) FROM pushbook_bookings") == std::to_string(rounds));
  // A different request with a used key: the conflict, whichever process gets it.
  const auto other = test::one("u", "r", 2, "key-0");
  auto at_first = first.submit(other), at_second = second.submit(other);
  REQUIRE_FALSE(at_first);
  REQUIRE_FALSE(at_second);
  CHECK(at_first.error().is(errc::idempotency_conflict));
  CHECK(at_second.error().is(errc::idempotency_conflict));
  CHECK(pg.query("SELECT count(*) FROM pushbook_bookings") == std::to_string(rounds));
}

TEST_CASE(
    "a store that closes hands over at once (NOTIFY): its undecided bookings are decided and its "
    "unpublished versions relayed by another process long before the lease") {
  PostgresServer pg;
  auto options = quick_options();
  options.lease = 30s;
  options.poll_interval = 30s;  // nothing but the notification can wake the other store in time
  options.node_id = "leaving";
  auto leaving = open_ok(pg, options);
  REQUIRE(leaving->put_resource("r", 10));
  // Claimed by "leaving" and never decided; confirmed by "leaving" and never published.
  auto undecided = make_booking("undecided", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*leaving, undecided));
  auto unpublished = make_booking("unpublished", BookingStatus::processing, {{"r", 2}});
  REQUIRE(commit(*leaving, unpublished));
  REQUIRE(advance(*leaving, unpublished, BookingStatus::confirmed));
  leaving->published("undecided", 1);

  options.node_id = "staying";
  auto bus = std::make_shared<LocalBus>();
  test::Collector<std::pair<std::string, std::uint64_t>> seen;
  auto sub = bus->subscribe("booking/*",
                            [&](const Delivery& d) {
                              if (d.kind == Delivery::Kind::event)
                                seen.push({std::string(d.event->topic()), d.event->seq()});
                            })
                 .value();
  test::Collector<std::uint32_t> attempts;  // what the handler is told
  EngineOptions o;
  o.store = open_ok(pg, options);
  o.handler = [&](const Booking& b, Completion done) {
    attempts.push(b.attempt);
    done(Decision::approved());
  };
  BookingEngine staying(bus, o);
  // Within the lease, the other process's work is not taken: it may still be doing it.
  CHECK(staying.stats().taken_over == 0);
  CHECK(staying.stats().relayed == 0);

  const auto start = std::chrono::steady_clock::now();
  leaving.reset();  // closes: claims released, outbox stamped, NOTIFY pushbook_handover
  REQUIRE(
      eventually([&] { return staying.get("undecided").value().status == BookingStatus::confirmed; }, 10s));
  REQUIRE(eventually([&] { return staying.stats().relayed == 1; }, 10s));
  const auto took =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  MESSAGE("handed over in " << took.count() << " ms (lease and poll 30,000 ms)");
  CHECK(took < 10s);
  CHECK(attempts.wait_for(1) == std::vector<std::uint32_t>{2});  // the second claim
  CHECK(staying.stats().taken_over == 1);
  // The relayed version once, and the decision of the one taken over.
  auto got = seen.wait_for(2);
  std::set<std::pair<std::string, std::uint64_t>> events(got.begin(), got.end());
  CHECK(events.count({"booking/unpublished", 2}) == 1);
  CHECK(events.count({"booking/undecided", 2}) == 1);
  CHECK(counters(pg, "r") == "10 0 3");
}

TEST_CASE("a closing store hands over only its own work, not another live store's under the same node id") {
  PostgresServer pg;
  auto options = quick_options();
  options.lease = 30s;
  options.node_id = "slot";
  auto old_one = open_ok(pg, options);
  auto replacement = open_ok(pg, options);  // opened before the old one closed
  auto x = make_booking("x", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*old_one, x));
  auto y = make_booking("y", BookingStatus::processing, {{"r", 1}});
  REQUIRE(commit(*replacement, y));
  old_one.reset();
  CHECK(pg.query("SELECT id || ' ' || (lease_until IS NULL)::text FROM pushbook_bookings ORDER BY id") ==
        "x true\ny false");
  // The replacement's versions stay in the outbox as fresh rows (not stale: nobody relays them).
  CHECK(pg.query("SELECT booking_id FROM pushbook_outbox WHERE stored_at > now() - interval '1 hour' "
                 "ORDER BY booking_id") == "y");
}
