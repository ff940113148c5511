// Three engine processes (tests/cluster_node.cpp) on one PostgreSQL database and one Redis bus,
// each with several threads of random operations (book one line or two, hold and then confirm,
// release or let expire, cancel, change capacity): 100,000 operations in all (fewer in the
// sanitizer builds). Every resource/<id> event any process publishes is watched: none ever shows
// more units reserved and confirmed than the capacity, and each topic's seqs only grow. At the
// end the database's counters equal what its booking rows add up to, the last event of each
// resource says the same, and no booking is left processing or held.
// Set PUSHBOOK_SEED to replay a run; the seed is printed.
#include <pushbook/redis_bus.hpp>

#include "postgres_server.hpp"
#include "redis_server.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::eventually;
using pushbook::test::PostgresServer;
using pushbook::test::RedisServer;

#ifndef PUSHBOOK_CLUSTER_OPS
#define PUSHBOOK_CLUSTER_OPS 100000
#endif

namespace {

constexpr int processes = 3;
constexpr int threads_per_process = 4;
const std::vector<std::string> resource_ids = {"r0", "r1", "r2", "r3"};

std::uint64_t seed_from_env() {
  if (const char* s = std::getenv("PUSHBOOK_SEED")) return std::strtoull(s, nullptr, 10);
  return std::random_device{}();
}

// tests/cluster_node.cpp as a child process; its output goes where the test's goes.
class ClusterNode {
 public:
  ClusterNode(const std::string& conninfo, const std::string& redis, std::uint64_t seed, int ops) {
    const std::string seed_text = std::to_string(seed), threads = std::to_string(threads_per_process),
                      ops_text = std::to_string(ops);
    std::fflush(stdout);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::execl(PUSHBOOK_CLUSTER_NODE, PUSHBOOK_CLUSTER_NODE, conninfo.c_str(), redis.c_str(),
              seed_text.c_str(), threads.c_str(), ops_text.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
  }
  ~ClusterNode() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  ClusterNode(const ClusterNode&) = delete;
  ClusterNode& operator=(const ClusterNode&) = delete;

  // Its exit status once it exits within `timeout`; -1 if it is still running then.
  int wait(std::chrono::steady_clock::time_point deadline) {
    for (;;) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(20ms);
    }
  }

 private:
  pid_t pid_ = -1;
};

// Watches resource/* on the shared bus.
struct ResourceWatcher {
  std::mutex mutex;
  std::map<std::string, std::uint64_t> last_seq;
  std::map<std::string, std::string> last_counts;  // "capacity reserved confirmed"
  std::vector<std::string> problems;
  std::uint64_t events = 0;

  void on(const Delivery& d) {
    std::lock_guard lock(mutex);
    if (d.kind != Delivery::Kind::event) return;  // a resync notice: the next events say the state
    const auto& o = d.event->data().as_object();
    const auto capacity = o.at("capacity").as_int64(), reserved = o.at("reserved").as_int64(),
               confirmed = o.at("confirmed").as_int64();
    const std::string topic(d.event->topic());
    ++events;
    if (reserved + confirmed > capacity)
      problems.push_back(topic + " seq " + std::to_string(d.event->seq()) + ": " + std::to_string(reserved) +
                         " reserved + " + std::to_string(confirmed) + " confirmed > capacity " +
                         std::to_string(capacity));
    auto& seq = last_seq[topic];
    if (d.event->seq() <= seq)
      problems.push_back(topic + ": seq " + std::to_string(d.event->seq()) + " after " + std::to_string(seq));
    seq = d.event->seq();
    last_counts[topic] =
        std::to_string(capacity) + " " + std::to_string(reserved) + " " + std::to_string(confirmed);
  }
};

}  // namespace

TEST_CASE(
    "three engine processes on one database, 100,000 random operations: never overbooked, counts exact") {
  const auto seed = seed_from_env();
  std::printf("postgres_cluster_test: seed %llu (PUSHBOOK_SEED=%llu to replay), %d operations\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed),
              PUSHBOOK_CLUSTER_OPS);
  std::fflush(stdout);
  INFO("seed = ", seed);

  PostgresServer pg;
  RedisServer redis;
  RedisBusOptions ro;
  ro.address = redis.address();
  ro.key_prefix = "pb:";
  auto bus = std::make_shared<RedisBus>(ro);
  REQUIRE(bus->wait_connected(10s));
  ResourceWatcher watcher;
  SubscribeOptions so;
  so.max_queue = 1u << 22;
  so.snapshot = false;
  auto watch = bus->subscribe(
                      "resource/*", [&](const Delivery& d) { watcher.on(d); }, so)
                   .value();

  const int ops_per_thread = PUSHBOOK_CLUSTER_OPS / (processes * threads_per_process);
  std::vector<std::unique_ptr<ClusterNode>> nodes;
  for (int i = 0; i < processes; ++i)
    nodes.push_back(std::make_unique<ClusterNode>(pg.conninfo(), redis.address(),
                                                  seed + static_cast<std::uint64_t>(i), ops_per_thread));
  const auto deadline = std::chrono::steady_clock::now() + 8min;
  for (int i = 0; i < processes; ++i) {
    CAPTURE(i);
    CHECK(nodes[static_cast<std::size_t>(i)]->wait(deadline) == 0);
  }

  // The database: counters equal the booking rows, nothing overbooked, nothing left undecided.
  CHECK(pg.query("SELECT count(*) FROM pushbook_bookings WHERE status IN ('processing', 'held')") == "0");
  std::map<std::string, std::string> stored;
  for (const auto& id : resource_ids) {
    CAPTURE(id);
    const auto counts = pg.query(
        "SELECT capacity || ' ' || reserved || ' ' || confirmed FROM pushbook_resources "
        "WHERE id = '" +
        id + "'");
    const auto recount = pg.query(
        "SELECT coalesce(sum(l.quantity) FILTER (WHERE b.status = 'held'), 0) || ' ' || "
        "coalesce(sum(l.quantity) FILTER (WHERE b.status = 'confirmed'), 0) "
        "FROM pushbook_bookings b, json_to_recordset(b.lines) AS l(resource text, quantity bigint) "
        "WHERE l.resource = '" +
        id + "'");
    REQUIRE(!counts.empty());
    CHECK(counts.substr(counts.find(' ') + 1) == recount);
    CHECK(pg.query("SELECT (reserved + confirmed <= capacity)::text FROM pushbook_resources WHERE id = '" +
                   id + "'") == "true");
    stored["resource/" + id] = counts;
  }
  // The last event of each resource is the database's row.
  CHECK(eventually(
      [&] {
        std::lock_guard lock(watcher.mutex);
        return watcher.last_counts == stored;
      },
      10s));
  std::lock_guard lock(watcher.mutex);
  CHECK(watcher.problems.empty());
  if (!watcher.problems.empty()) MESSAGE("first problem: " << watcher.problems.front());
  CHECK(watch.active());
  MESSAGE(pg.query("SELECT sum(n) || ' bookings: ' || string_agg(status || ' ' || n, ', ') FROM (SELECT "
                   "status, count(*) AS n FROM pushbook_bookings GROUP BY status ORDER BY status) s")
          << "; " << watcher.events << " resource events checked");
}
