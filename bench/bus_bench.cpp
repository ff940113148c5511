// pushbook-bus-bench: the event bus, LocalBus and RedisBus side by side in the same run (issue #12).
//
//   throughput  publish() calls per second from one process for a fixed time, no subscriber, with
//               each number of publisher threads of --threads (default 0,1,16,64; RedisBus:
//               concurrent publishes share the command connection's pipeline; a single thread
//               waits for each reply, so it is one round trip per publish by construction).
//               0 threads means one thread calling publish_async() (at most 4,096 outstanding):
//               pipelined from one thread, as the engine publishes.
//   latency     publish -> subscriber callback with publishes paced at --rate per second for
//               --seconds, measured from each event's *scheduled* send time (a late publish counts
//               its lateness: no coordinated omission). LocalBus: the subscriber in this process
//               (the baseline). RedisBus: in this process, and in a second process (this program
//               run again with --subscriber) that subscribes through a RedisBus of its own.
// Every measurement runs --runs times; the tables show the median of each column over the runs.
// A redis-server of the bench's own is started on a free loopback port in a temporary directory,
// without persistence (tests/redis_server.hpp), unless --redis names one.
//
//   pushbook-bus-bench [--only throughput|latency] [--bus local|redis|both] [--runs N]
//                      [--threads N,N,...] [--throughput-seconds S] [--rate R] [--seconds S]
//                      [--redis ADDRESS] [--json]
#include <pushbook/event_bus.hpp>
#include <pushbook/metrics.hpp>
#include <pushbook/redis_bus.hpp>

#include "redis_server.hpp"

#include <fmt/format.h>
#include <boost/json.hpp>

#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

using namespace pushbook;
using steady = std::chrono::steady_clock;

namespace {

struct Options {
  std::string only;          // throughput or latency; empty: both
  std::string bus = "both";  // local, redis or both
  int runs = 5;
  std::vector<int> threads = {0, 1, 16, 64};  // publisher threads (0: one, with publish_async)
  double throughput_seconds = 2;
  int rate = 2'000;
  int seconds = 5;
  std::string redis;  // an existing Redis; empty: start one
  bool json = false;
};

// steady_clock is CLOCK_MONOTONIC on Linux: one clock for every process of the machine, so a
// time stamped by the publisher can be compared with the subscriber's in another process.
std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(steady::now().time_since_epoch()).count();
}

template <class T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The median of each field over the runs (each column separately).
LatencySummary median_summary(const std::vector<LatencySummary>& runs) {
  auto field = [&](auto member) {
    std::vector<std::uint64_t> v;
    for (const auto& r : runs) v.push_back(r.*member);
    return median(v);
  };
  LatencySummary m;
  m.count = field(&LatencySummary::count);
  m.p50_ns = field(&LatencySummary::p50_ns);
  m.p90_ns = field(&LatencySummary::p90_ns);
  m.p99_ns = field(&LatencySummary::p99_ns);
  m.p999_ns = field(&LatencySummary::p999_ns);
  m.max_ns = field(&LatencySummary::max_ns);
  return m;
}

RedisBusOptions redis_options(const std::string& address) {
  RedisBusOptions o;
  o.address = address;
  o.key_prefix = "pushbook-bench:";
  o.log = [](const std::string& line) { fmt::print(stderr, "redis bus: {}\n", line); };
  return o;
}

std::shared_ptr<EventBus> make_bus(const std::string& kind, const std::string& address) {
  if (kind == "local") return std::make_shared<LocalBus>();
  auto bus = std::make_shared<RedisBus>(redis_options(address));
  if (!bus->wait_connected(std::chrono::seconds(10)))
    throw std::runtime_error("Redis at " + address + " does not answer");
  return bus;
}

// A payload the size of a booking's state.
std::shared_ptr<const boost::json::value> booking_like(std::int64_t scheduled_ns, bool end = false) {
  boost::json::object o{{"id", "b-01J9Z7Q4K8M2N6P0R3S5T7V9X1"},
                        {"resource", "hall"},
                        {"quantity", 1},
                        {"status", "confirmed"},
                        {"user", "u-1234"},
                        {"t", scheduled_ns}};
  if (end) o["end"] = true;
  return std::make_shared<const boost::json::value>(std::move(o));
}

// --- throughput ----------------------------------------------------------------------------------

struct ThroughputResult {
  double per_second = 0;
  std::uint64_t failures = 0;
};

// One thread publish_async()s for `seconds` to 64 topics in turn, with at most 4,096 publishes
// outstanding; counted when their callbacks have come.
ThroughputResult bench_throughput_async(EventBus& bus, double seconds, int run) {
  const auto data = booking_like(0);
  std::vector<std::string> topics;
  for (int i = 0; i < 64; ++i) topics.push_back(fmt::format("bench/tpa{}/{}", run, i));
  struct counts {
    std::mutex m;
    std::condition_variable cv;
    std::uint64_t outstanding = 0, ok = 0, failed = 0;
  };
  auto c = std::make_shared<counts>();
  const auto t0 = steady::now();
  const auto end = t0 + std::chrono::duration<double>(seconds);
  for (std::size_t i = 0; steady::now() < end; ++i) {
    {
      std::unique_lock lock(c->m);
      c->cv.wait(lock, [&] { return c->outstanding < 4096; });
      ++c->outstanding;
    }
    bus.publish_async(topics[i % topics.size()], data, [c](result<EventPtr> r) {
      std::lock_guard lock(c->m);
      --c->outstanding;
      ++(r ? c->ok : c->failed);
      c->cv.notify_all();
    });
  }
  std::unique_lock lock(c->m);
  c->cv.wait(lock, [&] { return c->outstanding == 0; });
  const double elapsed = std::chrono::duration<double>(steady::now() - t0).count();
  return {static_cast<double>(c->ok) / elapsed, c->failed};
}

// `threads` threads publish for `seconds`, each to 64 topics of its own in turn (0: one thread
// with publish_async).
ThroughputResult bench_throughput(EventBus& bus, int threads, double seconds, int run) {
  if (threads == 0) return bench_throughput_async(bus, seconds, run);
  const auto data = booking_like(0);
  std::vector<std::vector<std::string>> topics(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t)
    for (int i = 0; i < 64; ++i)
      topics[static_cast<std::size_t>(t)].push_back(fmt::format("bench/tp{}-{}-{}/{}", run, threads, t, i));
  std::atomic<std::uint64_t> published{0}, failures{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t)
    workers.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      const auto end = steady::now() + std::chrono::duration<double>(seconds);
      const auto& mine = topics[static_cast<std::size_t>(t)];
      std::uint64_t ok = 0, failed = 0;
      for (std::size_t i = 0; steady::now() < end; ++i) {
        if (bus.publish(mine[i % mine.size()], data))
          ++ok;
        else
          ++failed;
      }
      published += ok;
      failures += failed;
    });
  const auto t0 = steady::now();
  go.store(true);
  for (auto& w : workers) w.join();
  const double elapsed = std::chrono::duration<double>(steady::now() - t0).count();
  return {static_cast<double>(published.load()) / elapsed, failures.load()};
}

// --- latency -------------------------------------------------------------------------------------

// Sleeps until shortly before `at`, then yields until it: sleeps alone are too coarse, a pure
// busy-wait would hold one of the 2 cores from the subscriber.
void wait_until(steady::time_point at) {
  const auto early = at - std::chrono::microseconds(200);
  if (steady::now() < early) std::this_thread::sleep_until(early);
  while (steady::now() < at) std::this_thread::yield();
}

struct Paced {
  std::uint64_t published = 0;
  std::uint64_t failures = 0;
};

// Publishes `rate`/s for `seconds` to `topic`, each event stamped with its scheduled time; then
// one end marker.
Paced publish_paced(EventBus& bus, const std::string& topic, int rate, int seconds) {
  const auto interval = std::chrono::nanoseconds(1'000'000'000LL / rate);
  const auto count = static_cast<std::int64_t>(rate) * seconds;
  const auto start = steady::now() + std::chrono::milliseconds(20);
  Paced p;
  for (std::int64_t i = 0; i < count; ++i) {
    const auto at = start + interval * i;
    wait_until(at);
    if (bus.publish(topic,
                    booking_like(
                        std::chrono::duration_cast<std::chrono::nanoseconds>(at.time_since_epoch()).count())))
      ++p.published;
    else
      ++p.failures;
  }
  (void)bus.publish(topic, booking_like(0, true));
  return p;
}

// A subscriber that records publish -> callback times until the end marker.
struct Recorder {
  LatencyHistogram histogram;
  std::mutex mutex;
  std::condition_variable ended_cv;
  bool ended = false;

  DeliveryCallback callback() {
    return [this](const Delivery& d) {
      if (d.kind != Delivery::Kind::event) return;
      const auto& o = d.event->data().as_object();
      if (o.contains("end")) {
        std::lock_guard lock(mutex);
        ended = true;
        ended_cv.notify_all();
        return;
      }
      histogram.record(
          static_cast<std::uint64_t>(std::max<std::int64_t>(0, now_ns() - o.at("t").as_int64())));
    };
  }
  bool wait_end(std::chrono::seconds timeout) {
    std::unique_lock lock(mutex);
    return ended_cv.wait_for(lock, timeout, [&] { return ended; });
  }
};

struct LatencyResult {
  LatencySummary latency;
  std::uint64_t published = 0;
  std::uint64_t failures = 0;
};

SubscribeOptions live_only() {
  SubscribeOptions so;
  so.snapshot = false;
  so.max_queue = 1 << 20;  // the measurement, not the bound: nothing may be dropped
  return so;
}

LatencyResult bench_latency_in_process(EventBus& bus, const Options& o, int run) {
  const auto topic = fmt::format("bench/lat-in-{}", run);
  Recorder recorder;
  auto sub = bus.subscribe(topic, recorder.callback(), live_only()).value();
  const auto paced = publish_paced(bus, topic, o.rate, o.seconds);
  if (!recorder.wait_end(std::chrono::seconds(30)))
    fmt::print(stderr, "warning: the end marker never came\n");
  return {recorder.histogram.summary(), paced.published, paced.failures};
}

// The directory and file of this executable (to run it again as the subscriber process).
std::string self_path() {
  char buf[4096];
  const auto n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return std::string(buf, n > 0 ? static_cast<std::size_t>(n) : 0);
}

// Reads one line from `fd` within `timeout`; nullopt on timeout or end of file.
std::optional<std::string> read_line(int fd, std::chrono::milliseconds timeout) {
  const auto give_up = steady::now() + timeout;
  std::string line;
  for (char c = 0;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(give_up - steady::now()).count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0 || read(fd, &c, 1) != 1) return std::nullopt;
    if (c == '\n') return line;
    line += c;
  }
}

LatencyResult bench_latency_cross_process(EventBus& bus, const Options& o, const std::string& address,
                                          int run) {
  const auto topic = fmt::format("bench/lat-x-{}", run);
  int out[2];
  if (pipe(out) != 0) throw std::runtime_error("pipe failed");
  std::vector<std::string> args = {self_path(), "--subscriber", "--redis",   address,
                                   "--topic",   topic,          "--seconds", std::to_string(o.seconds)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_addclose(&fa, out[0]);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  close(out[1]);
  if (rc != 0) throw std::runtime_error(fmt::format("cannot start the subscriber: {}", std::strerror(rc)));
  auto finish = [&] {
    close(out[0]);
    int status = 0;
    waitpid(pid, &status, 0);
  };
  if (read_line(out[0], std::chrono::seconds(15)) != "ready") {
    kill(pid, SIGKILL);
    finish();
    throw std::runtime_error("the subscriber process did not subscribe");
  }
  const auto paced = publish_paced(bus, topic, o.rate, o.seconds);
  const auto line = read_line(out[0], std::chrono::seconds(60));
  finish();
  if (!line || !line->starts_with("result "))
    throw std::runtime_error("the subscriber process gave no result");
  LatencyResult r;
  std::istringstream in(line->substr(7));
  in >> r.latency.count >> r.latency.p50_ns >> r.latency.p90_ns >> r.latency.p99_ns >> r.latency.p999_ns >>
      r.latency.max_ns;
  r.published = paced.published;
  r.failures = paced.failures;
  return r;
}

// The subscriber process: subscribes through a RedisBus of its own, says "ready", records until
// the end marker, prints "result <count> <p50> <p90> <p99> <p99.9> <max>" (ns).
int run_subscriber(const std::string& address, const std::string& topic, int seconds) {
  auto bus = make_bus("redis", address);
  Recorder recorder;
  auto sub = bus->subscribe(topic, recorder.callback(), live_only());
  if (!sub) {
    fmt::print(stderr, "subscriber: {}\n", sub.error().message);
    return 1;
  }
  fmt::print("ready\n");
  std::fflush(stdout);
  recorder.wait_end(std::chrono::seconds(seconds + 30));
  const auto s = recorder.histogram.summary();
  fmt::print("result {} {} {} {} {} {}\n", s.count, s.p50_ns, s.p90_ns, s.p99_ns, s.p999_ns, s.max_ns);
  std::fflush(stdout);
  return 0;
}

// --- output --------------------------------------------------------------------------------------

std::string machine() {
  std::string load = "?";
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    char buf[128] = {};
    if (std::fgets(buf, sizeof buf, f)) load = std::string(buf, strcspn(buf, "\n"));
    std::fclose(f);
  }
  return fmt::format("{} cores, load average {}", std::thread::hardware_concurrency(), load);
}

boost::json::object summary_json(const LatencySummary& s) {
  return {{"count", s.count},         {"p50_ms", s.p50_ns / 1e6},   {"p90_ms", s.p90_ns / 1e6},
          {"p99_ms", s.p99_ns / 1e6}, {"p999_ms", s.p999_ns / 1e6}, {"max_ms", s.max_ns / 1e6}};
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool subscriber = false;
  std::string topic;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        fmt::print(stderr, "{} needs a value\n", a);
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--only")
      o.only = value();
    else if (a == "--bus")
      o.bus = value();
    else if (a == "--runs")
      o.runs = std::stoi(value());
    else if (a == "--threads") {
      o.threads.clear();
      std::istringstream list(value());
      for (std::string n; std::getline(list, n, ',');) o.threads.push_back(std::stoi(n));
    } else if (a == "--throughput-seconds")
      o.throughput_seconds = std::stod(value());
    else if (a == "--rate")
      o.rate = std::stoi(value());
    else if (a == "--seconds")
      o.seconds = std::stoi(value());
    else if (a == "--redis")
      o.redis = value();
    else if (a == "--json")
      o.json = true;
    else if (a == "--subscriber")  // internal: the second process of the latency measurement
      subscriber = true;
    else if (a == "--topic")
      topic = value();
    else {
      fmt::print(
          stderr,
          "usage: pushbook-bus-bench [--only throughput|latency] [--bus local|redis|both] [--runs N]\n"
          "                          [--threads N,N,...] [--throughput-seconds S] [--rate R] [--seconds S]\n"
          "                          [--redis ADDRESS] [--json]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (subscriber) return run_subscriber(o.redis, topic, o.seconds);
  if ((o.bus != "local" && o.bus != "redis" && o.bus != "both") || o.runs < 1 || o.threads.empty() ||
      o.rate < 1) {
    fmt::print(stderr, "bad arguments (--help)\n");
    return 2;
  }
  std::signal(SIGPIPE, SIG_IGN);
  std::vector<std::string> buses;
  if (o.bus != "redis") buses.push_back("local");
  if (o.bus != "local") buses.push_back("redis");
  std::unique_ptr<test::RedisServer> redis_server;
  std::string address = o.redis;
  if (address.empty() && o.bus != "local") {
    redis_server = std::make_unique<test::RedisServer>();
    address = redis_server->address();
  }
  const auto load_before = machine();
  auto want = [&](std::string_view what) { return o.only.empty() || o.only == what; };
  const auto& thread_counts = o.threads;

  // [bus][thread count index] -> runs; latency: [row] -> runs. Runs interleave the buses, so that
  // a slow minute of the VM hits both.
  std::map<std::pair<std::string, int>, std::vector<ThroughputResult>> throughput;
  std::vector<std::pair<std::string, std::string>> latency_rows;  // bus, where
  for (const auto& b : buses) {
    latency_rows.emplace_back(b, "in-process");
    if (b == "redis") latency_rows.emplace_back(b, "cross-process");
  }
  std::map<std::pair<std::string, std::string>, std::vector<LatencyResult>> latency;
  for (int run = 0; run < o.runs; ++run) {
    for (const auto& b : buses) {
      auto bus = make_bus(b, address);
      if (want("throughput"))
        for (int t : thread_counts)
          throughput[{b, t}].push_back(bench_throughput(*bus, t, o.throughput_seconds, run));
      if (want("latency")) {
        latency[{b, "in-process"}].push_back(bench_latency_in_process(*bus, o, run));
        if (b == "redis")
          latency[{b, "cross-process"}].push_back(bench_latency_cross_process(*bus, o, address, run));
      }
    }
    if (!o.json) fmt::print(stderr, "run {}/{} done\n", run + 1, o.runs);
  }
  const auto load_after = machine();

  auto throughput_median = [&](const std::string& b, int t) {
    std::vector<double> v;
    for (const auto& r : throughput[{b, t}]) v.push_back(r.per_second);
    return median(v);
  };
  auto failures_of = [](const auto& runs) {
    std::uint64_t n = 0;
    for (const auto& r : runs) n += r.failures;
    return n;
  };
  auto latency_median = [&](const std::pair<std::string, std::string>& row) {
    std::vector<LatencySummary> v;
    for (const auto& r : latency[row]) v.push_back(r.latency);
    return median_summary(v);
  };
  auto lost_of = [&](const std::pair<std::string, std::string>& row) {
    std::uint64_t lost = 0;
    for (const auto& r : latency[row])
      lost += r.published > r.latency.count ? r.published - r.latency.count : 0;
    return lost;
  };
  // A lost event or a failed publish is a fault, not a figure: the exit status says so (ctest
  // runs this program at a small scale as bus_bench_test).
  bool faults = false;
  for (const auto& [key, runs] : throughput) faults = faults || failures_of(runs) > 0;
  for (const auto& row : latency_rows)
    if (latency.contains(row)) faults = faults || lost_of(row) > 0 || failures_of(latency[row]) > 0;
  if (faults)
    fmt::print(stderr, "pushbook-bus-bench: events were lost or publishes failed (see lost/fail)\n");

  if (o.json) {
    boost::json::object out{{"machine_before", load_before}, {"machine_after", load_after}, {"runs", o.runs}};
    boost::json::array tp;
    for (const auto& [key, runs] : throughput) {
      boost::json::array each;
      for (const auto& r : runs) each.push_back(r.per_second);
      tp.push_back(boost::json::object{{"bus", key.first},
                                       {"threads", key.second},
                                       {"seconds", o.throughput_seconds},
                                       {"runs", std::move(each)},
                                       {"median_per_second", throughput_median(key.first, key.second)},
                                       {"failures", failures_of(runs)}});
    }
    out["throughput"] = std::move(tp);
    boost::json::array lat;
    for (const auto& row : latency_rows) {
      if (!latency.contains(row)) continue;
      boost::json::array each;
      for (const auto& r : latency[row]) each.push_back(summary_json(r.latency));
      lat.push_back(boost::json::object{{"bus", row.first},
                                        {"subscriber", row.second},
                                        {"rate", o.rate},
                                        {"seconds", o.seconds},
                                        {"runs", std::move(each)},
                                        {"median", summary_json(latency_median(row))},
                                        {"lost", lost_of(row)},
                                        {"publish_failures", failures_of(latency[row])}});
    }
    out["latency"] = std::move(lat);
    fmt::print("{}\n", boost::json::serialize(out));
    return faults ? 1 : 0;
  }

  fmt::print("machine: {} (before), {} (after)\n", load_before, load_after);
  if (!throughput.empty()) {
    fmt::print("\npublish throughput from one process, no subscriber, {} s per run (median of {} runs):\n",
               o.throughput_seconds, o.runs);
    fmt::print("  {:<7} {:>8} {:>14} {:>10}  {}\n", "bus", "threads", "events/s", "failures", "runs");
    for (int t : thread_counts)
      for (const auto& b : buses) {
        std::string runs;
        for (const auto& r : throughput[{b, t}])
          runs += fmt::format("{}{:.0f}", runs.empty() ? "" : ", ", r.per_second);
        fmt::print("  {:<7} {:>8} {:>14.0f} {:>10}  {}\n", b, t == 0 ? "1 async" : std::to_string(t),
                   throughput_median(b, t), failures_of(throughput[{b, t}]), runs);
      }
    if (buses.size() == 2)
      for (int t : thread_counts)
        fmt::print("  redis/local, {}: {:.3f}\n",
                   t == 0 ? "1 thread, publish_async" : std::to_string(t) + " threads",
                   throughput_median("redis", t) / throughput_median("local", t));
  }
  if (!latency.empty()) {
    fmt::print(
        "\npublish -> callback, {} events/s for {} s, from the scheduled send time (median of {} runs, "
        "each column its own median):\n",
        o.rate, o.seconds, o.runs);
    fmt::print("  {:<7} {:<14} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>5} {:>5}  {}\n", "bus", "subscriber",
               "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "lost", "fail", "p99 of each run (ms)");
    for (const auto& row : latency_rows) {
      if (!latency.contains(row)) continue;
      const auto m = latency_median(row);
      std::string runs;
      for (const auto& r : latency[row])
        runs += fmt::format("{}{:.3f}", runs.empty() ? "" : ", ", r.latency.p99_ns / 1e6);
      fmt::print("  {:<7} {:<14} {:>9.3f} {:>9.3f} {:>9.3f} {:>9.3f} {:>9.3f}  {:>5} {:>5}  {}\n", row.first,
                 row.second, m.p50_ns / 1e6, m.p90_ns / 1e6, m.p99_ns / 1e6, m.p999_ns / 1e6, m.max_ns / 1e6,
                 lost_of(row), failures_of(latency[row]), runs);
    }
    fmt::print("  (lost: published, never received, over all runs; fail: publishes that failed)\n");
  }
  return faults ? 1 : 0;
}
