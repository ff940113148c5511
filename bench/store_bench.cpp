// pushbook-store-bench: the engine over each store, side by side in one run.
//
//   throughput  bookings per second through the engine (submit_async from 2 threads, at most
//               --in-flight bookings not yet ACKed, no handler), until every booking is decided,
//               and the submit -> ACK latency (the ACK waits for the store's commit)
//               over memory:, sqlite (sync=normal) and sqlite (sync=full), interleaved run by run;
//               with --postgres also over PostgresStore, on a PostgreSQL server the benchmark
//               starts (fsync on, synchronous_commit on: what a deployment pays), a fresh
//               database per run, over its unix socket
//               and with --postgres also "postgres x2": two engine processes (this program, run
//               again as children) on one database, each with half the bookings, started
//               together; bookings/s is all of them over the time from the start to the last
//               decision, the latencies the worse of the two processes'
//   takeover    (with --postgres) a child engine process ACKs --takeover-bookings bookings whose
//               handler never answers and is killed (kill -9); the time from the kill until an
//               engine in this process (lease --lease-ms) has decided all of them
//   restart     a SQLite file with --stored bookings (95% confirmed, 3% held, 1% processing, 1%
//               rejected, made through the engine), then the time from opening it to an engine
//               ready to take bookings (recovery included)
// Each measurement runs --runs times; the table shows medians. Files go to a temporary directory
// (removed at the end).
//
//   pushbook-store-bench [--runs N] [--bookings N] [--in-flight N] [--stored N] [--only WHAT] [--postgres]
//                        [--lease-ms N] [--takeover-bookings N] [--json]
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/metrics.hpp>
#include <pushbook/postgres_store.hpp>
#include <pushbook/sqlite_store.hpp>

#include "postgres_server.hpp"
#include "server_process.hpp"

#include <fmt/format.h>

#include <unistd.h>

#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <string_view>
#include <thread>
#include <vector>

using namespace pushbook;
using steady = std::chrono::steady_clock;
using pushbook::bench::TempDir;

namespace {

struct Options {
  int runs = 3;
  int bookings = 200'000;
  int in_flight = 4096;
  int stored = 1'000'000;
  bool json = false;
  std::string only;   // throughput or restart
  std::string store;  // throughput over this store only: memory, normal, full or postgres
  bool postgres = false;
  int lease_ms = 1000;
  int takeover_bookings = 100;
};

std::shared_ptr<BookingStore> open_or_die(const std::string& url) {
  auto s = open_store(url);
  if (!s) {
    fmt::print(stderr, "{}: {}\n", url, s.error().message);
    std::exit(1);
  }
  return *s;
}

// A counting semaphore with a wait: bounds the bookings submitted and not yet ACKed.
class Window {
 public:
  explicit Window(int n) : free_(n) {}
  void take() {
    std::unique_lock lock(m_);
    cv_.wait(lock, [&] { return free_ > 0; });
    --free_;
  }
  void give() {
    {
      std::lock_guard lock(m_);
      ++free_;
    }
    cv_.notify_one();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int free_;
};

BookingRequest request(std::string user, std::string resource = "r") {
  BookingRequest r;
  r.user = std::move(user);
  r.lines.push_back({std::move(resource), 1});
  return r;
}

struct Throughput {
  double bookings_per_s = 0;
  LatencySummary ack;
  LatencySummary decision;  // submit -> decision handed to the bus
};

// `ready`, when set, runs once the engine is up, before the clock starts (a child process waits
// there for its parent's "go").
Throughput bench_throughput(const std::string& url, int n, int window_size,
                            const std::function<void()>& ready = {}) {
  EngineOptions o;
  o.workers = 2;
  o.max_queue = 1u << 22;
  o.store = open_or_die(url);
  BookingEngine engine(std::make_shared<LocalBus>(), o);
  (void)engine.add_resource("r", 1u << 30);  // already_exists in the second process: fine
  if (ready) ready();
  LatencyHistogram ack;
  Window window(window_size);
  std::atomic<int> failed{0};
  const auto t0 = steady::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < n / 2; ++i) {
        window.take();
        const auto start = steady::now();
        engine.submit_async(request(fmt::format("u{}-{}", t, i % 1000)), [&, start](result<Ack> a) {
          ack.record(steady::now() - start);
          if (!a) failed.fetch_add(1);
          window.give();
        });
      }
    });
  for (auto& th : threads) th.join();
  while (engine.stats().in_flight > 0) std::this_thread::yield();
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  if (failed.load()) fmt::print(stderr, "{}: {} submits failed\n", url, failed.load());
  return {n / secs, ack.summary(), engine.stats().decision_latency};
}

// This program run again as a child, its stdin and stdout pipes to the parent.
class Child {
 public:
  explicit Child(std::vector<std::string> args) {
    int in[2], out[2];
    if (::pipe(in) != 0 || ::pipe(out) != 0) throw std::runtime_error("pipe failed");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      for (int fd : {in[0], in[1], out[0], out[1]}) ::close(fd);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    to_ = in[1];
    from_ = ::fdopen(out[0], "r");
  }
  ~Child() {
    if (to_ >= 0) ::close(to_);
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (from_) std::fclose(from_);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  // The next line it prints (without the newline); exits the benchmark if it ended.
  std::string line() {
    char buf[4096];
    if (!std::fgets(buf, sizeof buf, from_)) {
      fmt::print(stderr, "a child process ended early\n");
      std::exit(1);
    }
    std::string l(buf);
    if (!l.empty() && l.back() == '\n') l.pop_back();
    return l;
  }
  void send(std::string_view text) {
    if (::write(to_, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
      fmt::print(stderr, "cannot write to a child process\n");
      std::exit(1);
    }
  }
  void kill9() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int to_ = -1;
  FILE* from_ = nullptr;
};

// --child-throughput URL N WINDOW: "ready", waits for a line, runs, prints the figures.
int child_throughput(const std::string& url, int n, int window) {
  auto t = bench_throughput(url, n, window, [] {
    std::cout << "ready" << std::endl;
    std::string go;
    std::getline(std::cin, go);
  });
  std::cout << fmt::format("{} {} {} {} {}", t.bookings_per_s, t.ack.p50_ns, t.ack.p99_ns, t.decision.p50_ns,
                           t.decision.p99_ns)
            << std::endl;
  return 0;
}

// Two engine processes on `url`, n/2 bookings each, started together.
Throughput bench_two_processes(const std::string& url, int n, int window) {
  std::vector<std::unique_ptr<Child>> children;
  for (int c = 0; c < 2; ++c)
    children.push_back(
        std::make_unique<Child>(std::vector<std::string>{"pushbook-store-bench", "--child-throughput", url,
                                                         std::to_string(n / 2), std::to_string(window / 2)}));
  for (auto& c : children)
    if (c->line() != "ready") std::exit(1);
  const auto t0 = steady::now();
  for (auto& c : children) c->send("go\n");
  Throughput total;
  for (auto& c : children) {
    double bps;
    LatencySummary ack, decision;
    if (std::sscanf(c->line().c_str(), "%lf %lu %lu %lu %lu", &bps, &ack.p50_ns, &ack.p99_ns,
                    &decision.p50_ns, &decision.p99_ns) != 5)
      std::exit(1);
    total.ack.p50_ns = std::max(total.ack.p50_ns, ack.p50_ns);
    total.ack.p99_ns = std::max(total.ack.p99_ns, ack.p99_ns);
    total.decision.p50_ns = std::max(total.decision.p50_ns, decision.p50_ns);
    total.decision.p99_ns = std::max(total.decision.p99_ns, decision.p99_ns);
  }
  total.bookings_per_s = (n / 2 * 2) / std::chrono::duration<double>(steady::now() - t0).count();
  return total;
}

// --child-hang URL N: an engine whose handler never answers; "ready" once N bookings are ACKed
// and their handlers started; then waits to be killed.
int child_hang(const std::string& url, int n, int lease_ms) {
  PostgresOptions po;
  po.lease = std::chrono::milliseconds(lease_ms);
  auto store = PostgresStore::open(url, po);
  if (!store) {
    fmt::print(stderr, "{}\n", store.error().message);
    return 1;
  }
  std::atomic<int> started{0};
  EngineOptions o;
  o.store = *store;
  o.handler_timeout = std::chrono::hours(1);
  o.handler = [&](const Booking&, Completion) { started.fetch_add(1); };
  BookingEngine engine(std::make_shared<LocalBus>(), o);
  (void)engine.add_resource("r", 1u << 30);
  for (int i = 0; i < n; ++i)
    if (!engine.submit(request(fmt::format("h{}", i)))) return 1;
  while (started.load() < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  std::cout << "ready" << std::endl;
  std::string never;
  std::getline(std::cin, never);
  return 0;
}

// From kill -9 of a process deciding `n` bookings to their decisions by an engine here.
double bench_takeover(const std::string& url, int n, int lease_ms) {
  Child hung({"pushbook-store-bench", "--child-hang", url, std::to_string(n), std::to_string(lease_ms)});
  if (hung.line() != "ready") std::exit(1);
  PostgresOptions po;
  po.lease = std::chrono::milliseconds(lease_ms);
  EngineOptions o;
  o.store = PostgresStore::open(url, po).value();
  o.handler = [](const Booking&, Completion done) { done(Decision::approved()); };
  BookingEngine engine(std::make_shared<LocalBus>(), o);
  hung.kill9();
  const auto t0 = steady::now();
  while (engine.stats().taken_over < static_cast<std::uint64_t>(n) || engine.stats().in_flight > 0) {
    if (steady::now() - t0 > std::chrono::seconds(60) + std::chrono::milliseconds(lease_ms)) {
      fmt::print(stderr, "takeover: not done after a minute past the lease\n");
      std::exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return std::chrono::duration<double, std::milli>(steady::now() - t0).count();
}

// Fills `path` with `n` bookings through the engine, as a process that crashed would leave it:
// 95% confirmed, 3% held, 1% rejected, and 1% still processing (their handler never answers, and
// the engine is left running, never shut down, like a process killed with its handlers in flight).
void fill(const std::string& path, int n) {
  SqliteOptions so;
  auto store = SqliteStore::open(path, so).value();
  EngineOptions o;
  o.workers = 2;
  o.max_queue = 1u << 22;
  o.store = store;
  o.handler_timeout = std::chrono::hours(1);
  o.handler = [](const Booking& b, Completion done) {
    if (b.metadata.contains("hang")) return;  // never answered: stays processing in the store
    done(Decision::approved());
  };
  auto* engine = new BookingEngine(std::make_shared<LocalBus>(), o);  // never shut down: see above
  (void)engine->add_resource("r", 1u << 30);
  (void)engine->add_resource("small", static_cast<std::uint32_t>(n / 100));
  Window window(4096);
  std::atomic<int> acked{0};
  for (int i = 0; i < n; ++i) {
    auto r = request(fmt::format("u{}", i % 10000), i % 100 == 1 ? "small" : "r");
    if (i % 100 == 0) r.metadata["hang"] = true;
    if (i % 100 == 2 || i % 100 == 3 || i % 100 == 4) r.hold_for = std::chrono::hours(1);
    if (i % 100 == 5) r.lines[0].quantity = 1u << 30;  // more than is free: rejected
    window.take();
    engine->submit_async(std::move(r), [&](result<Ack>) {
      window.give();  // before `acked`: the caller returns (and `window` goes) once all are acked
      acked.fetch_add(1);
    });
  }
  // Everything ACKed and everything but the hanging ones decided: then the file is what a
  // crashed process leaves.
  while (acked.load() < n) std::this_thread::yield();
  while (engine->stats().in_flight > static_cast<std::uint64_t>(n / 100)) std::this_thread::yield();
}

// Opens a copy of `stored` (each run recovers the same state) and times open + recovery.
double bench_restart(const std::string& stored, const std::string& path) {
  std::filesystem::copy_file(stored, path, std::filesystem::copy_options::overwrite_existing);
  if (std::filesystem::exists(stored + "-wal"))
    std::filesystem::copy_file(stored + "-wal", path + "-wal",
                               std::filesystem::copy_options::overwrite_existing);
  std::filesystem::remove(path + "-shm");
  const auto t0 = steady::now();
  EngineOptions o;
  o.workers = 2;
  o.max_queue = 1u << 22;
  o.store = SqliteStore::open(path).value();
  o.handler = [](const Booking&, Completion done) { done(Decision::approved()); };
  BookingEngine engine(std::make_shared<LocalBus>(), o);
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  if (engine.stats().recovered == 0) fmt::print(stderr, "restart: nothing was recovered\n");
  engine.shutdown();
  return secs;
}

template <class T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double us(std::uint64_t ns) { return static_cast<double>(ns) / 1000.0; }

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::string_view(argv[1]) == "--child-throughput")
    return child_throughput(argv[2], std::atoi(argv[3]), std::atoi(argv[4]));
  if (argc == 5 && std::string_view(argv[1]) == "--child-hang")
    return child_hang(argv[2], std::atoi(argv[3]), std::atoi(argv[4]));
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) {
        fmt::print(stderr, "{} needs a value\n", a);
        std::exit(2);
      }
      return std::atoi(argv[++i]);
    };
    if (a == "--runs")
      opt.runs = std::max(1, value());
    else if (a == "--bookings")
      opt.bookings = std::max(1000, value());
    else if (a == "--in-flight")
      opt.in_flight = std::max(1, value());
    else if (a == "--stored")
      opt.stored = std::max(1000, value());
    else if (a == "--json")
      opt.json = true;
    else if (a == "--only" && i + 1 < argc)
      opt.only = argv[++i];
    else if (a == "--postgres")
      opt.postgres = true;
    else if (a == "--store" && i + 1 < argc)
      opt.store = argv[++i];
    else if (a == "--lease-ms")
      opt.lease_ms = std::max(100, value());
    else if (a == "--takeover-bookings")
      opt.takeover_bookings = std::max(1, value());
    else {
      fmt::print(stderr,
                 "usage: pushbook-store-bench [--runs N] [--bookings N] [--in-flight N] [--stored N] "
                 "[--only throughput|restart|takeover] [--store memory|normal|full|postgres] [--postgres] "
                 "[--lease-ms N] [--takeover-bookings N] [--json]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  std::optional<TempDir> made;
  try {
    made.emplace("pushbook-store-bench");
  } catch (const std::exception& e) {
    fmt::print(stderr, "{}\n", e.what());
    return 1;
  }
  const TempDir& dir = *made;
  std::vector<std::pair<std::string, std::string>> stores = {{"memory", "memory:"},
                                                             {"sqlite normal", "sqlite:{}/n{}.db"},
                                                             {"sqlite full", "sqlite:{}/f{}.db?sync=full"}};
  std::optional<pushbook::test::PostgresServer> postgres;
  if (opt.postgres && (opt.only.empty() || opt.only == "throughput" || opt.only == "takeover")) {
    try {
      postgres.emplace(pushbook::test::PostgresServerOptions{.fast_unsafe = false});
    } catch (const std::exception& e) {
      fmt::print(stderr, "--postgres: {}\n", e.what());
      return 1;
    }
    stores.push_back({"postgres", ""});
    stores.push_back({"postgres x2", ""});
  }
  // A fresh database per run for PostgreSQL, as a fresh file for SQLite.
  auto url_of = [&](std::size_t s, int r) {
    if (!stores[s].first.starts_with("postgres"))
      return fmt::format(fmt::runtime(stores[s].second), dir.path, r);
    const auto db = fmt::format("run{}_{}", r, s);
    if (postgres->command("postgres", "CREATE DATABASE " + db).empty() && !postgres->error().empty()) {
      fmt::print(stderr, "CREATE DATABASE {}: {}\n", db, postgres->error());
      std::exit(1);
    }
    return postgres->socket_uri(db);
  };
  std::vector<std::vector<Throughput>> runs(stores.size());
  if (opt.only.empty() || opt.only == "throughput")
    for (int r = 0; r < opt.runs; ++r) {
      for (std::size_t s = 0; s < stores.size(); ++s)  // interleaved: the machine's state hits all alike
        if (opt.store.empty() || stores[s].first.starts_with(opt.store) ||
            stores[s].first.ends_with(opt.store))
          runs[s].push_back(stores[s].first == "postgres x2"
                                ? bench_two_processes(url_of(s, r), opt.bookings, opt.in_flight)
                                : bench_throughput(url_of(s, r), opt.bookings, opt.in_flight));
      if (!opt.json) fmt::print(stderr, "throughput run {}/{} done\n", r + 1, opt.runs);
    }
  std::vector<double> takeovers;
  if (opt.postgres && (opt.only.empty() || opt.only == "takeover"))
    for (int r = 0; r < opt.runs; ++r) {
      const auto db = fmt::format("takeover{}", r);
      if (postgres->command("postgres", "CREATE DATABASE " + db).empty() && !postgres->error().empty()) {
        fmt::print(stderr, "CREATE DATABASE {}: {}\n", db, postgres->error());
        return 1;
      }
      takeovers.push_back(bench_takeover(postgres->socket_uri(db), opt.takeover_bookings, opt.lease_ms));
    }
  std::vector<double> restarts;
  if (opt.only.empty() || opt.only == "restart") {
    const auto path = dir.path + "/stored.db";
    if (!opt.json) fmt::print(stderr, "filling {} with {} bookings...\n", path, opt.stored);
    fill(path, opt.stored);
    for (int r = 0; r < opt.runs; ++r) restarts.push_back(bench_restart(path, dir.path + "/restart.db"));
  }

  struct Row {
    std::string name;
    double bps;
    LatencySummary ack;
    LatencySummary decision;
  };
  std::vector<Row> rows;
  for (std::size_t s = 0; s < stores.size(); ++s) {
    if (runs[s].empty()) continue;
    std::vector<double> bps;
    std::vector<std::uint64_t> p50, p99, d50, d99;
    for (auto& t : runs[s]) {
      bps.push_back(t.bookings_per_s);
      p50.push_back(t.ack.p50_ns);
      p99.push_back(t.ack.p99_ns);
      d50.push_back(t.decision.p50_ns);
      d99.push_back(t.decision.p99_ns);
    }
    LatencySummary l, d;
    l.p50_ns = median(p50);
    l.p99_ns = median(p99);
    d.p50_ns = median(d50);
    d.p99_ns = median(d99);
    rows.push_back({stores[s].first, median(bps), l, d});
  }
  if (opt.json) {
    std::string out = fmt::format(R"({{"runs":{},"bookings":{},"in_flight":{},"stores":[)", opt.runs,
                                  opt.bookings, opt.in_flight);
    for (std::size_t i = 0; i < rows.size(); ++i)
      out +=
          fmt::format(R"({}{{"store":"{}","bookings_per_s":{:.0f},"ack_p50_us":{:.1f},"ack_p99_us":{:.1f},)"
                      R"("decision_p50_us":{:.1f},"decision_p99_us":{:.1f}}})",
                      i ? "," : "", rows[i].name, rows[i].bps, us(rows[i].ack.p50_ns), us(rows[i].ack.p99_ns),
                      us(rows[i].decision.p50_ns), us(rows[i].decision.p99_ns));
    out += "]";
    if (!takeovers.empty())
      out += fmt::format(R"(,"lease_ms":{},"takeover_ms":{:.0f})", opt.lease_ms, median(takeovers));
    if (!restarts.empty())
      out += fmt::format(R"(,"stored":{},"restart_s":{:.3f})", opt.stored, median(restarts));
    fmt::print("{}}}\n", out);
    return 0;
  }
  fmt::print("pushbook store benchmark: {} runs, medians shown, {} cores\n\n", opt.runs,
             std::thread::hardware_concurrency());
  if (!rows.empty()) {
    fmt::print("{:<16} {:>12} {:>12} {:>12} {:>14} {:>14} {:>11}\n", "store", "bookings/s", "ACK p50 us",
               "ACK p99 us", "decided p50 us", "decided p99 us", "vs memory");
    for (const auto& r : rows)
      fmt::print("{:<16} {:>12.0f} {:>12.1f} {:>12.1f} {:>14.1f} {:>14.1f} {:>11}\n", r.name, r.bps,
                 us(r.ack.p50_ns), us(r.ack.p99_ns), us(r.decision.p50_ns), us(r.decision.p99_ns),
                 rows[0].name == "memory" ? fmt::format("{:.2f}x", rows[0].bps / r.bps) : std::string("-"));
  }
  if (!takeovers.empty())
    fmt::print(
        "\ntakeover after kill -9 of a process deciding {} bookings (lease {} ms): {:.0f} ms until all "
        "were decided by another\n",
        opt.takeover_bookings, opt.lease_ms, median(takeovers));
  if (!restarts.empty())
    fmt::print("\nrestart over {} stored bookings (open + recovery): {:.2f} s\n", opt.stored,
               median(restarts));
  return 0;
}
