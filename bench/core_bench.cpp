// pushbook-core-bench: in-process performance of the BookingEngine and the LocalBus.
//
// Measures, on this machine:
//   ack        submit() to ACK latency, one thread, no handler, memory store
//   decision   submit() to the decision event arriving at a booking/* subscriber
//   throughput bookings per second through the engine, 2 submitting threads, until all decided
//   bus        publish() to subscriber callback latency, one subscriber, paced publishes
//   fanout     deliveries per second, one topic, 10,000 subscribers
//   kept       heap bytes the engine, its MemoryStore and the LocalBus keep per decided booking
// Each measurement runs --runs times (default 5); the table shows the median run.
//
//   pushbook-core-bench [--runs N] [--bookings N] [--subscribers N] [--json]
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/metrics.hpp>

#include <fmt/format.h>

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string_view>
#include <thread>
#include <vector>

using namespace pushbook;
using steady = std::chrono::steady_clock;

namespace {

struct Options {
  int runs = 5;
  int bookings = 200'000;
  int subscribers = 10'000;
  bool json = false;
  std::string only;  // run one measurement: ack, decision, throughput, bus, fanout, kept
};

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(steady::now().time_since_epoch()).count();
}

double us(std::uint64_t ns) { return static_cast<double>(ns) / 1000.0; }

// Waits about `d` without sleeping (sleeps are far coarser than microseconds) but yielding, so a
// consumer thread that shares this core still runs: a pure busy-wait would hold the core for a
// whole scheduler time slice and show up as milliseconds of fake latency.
void pace(std::chrono::nanoseconds d) {
  const auto until = steady::now() + d;
  while (steady::now() < until) std::this_thread::yield();
}

template <class T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

BookingRequest request(const std::string& user) {
  BookingRequest r;
  r.user = user;
  r.lines.push_back({"r", 1});
  return r;
}

// --no-quotas: the engine without its per-user quota bookkeeping (to measure what it costs).
bool quotas_off = false;

EngineOptions engine_options() {
  EngineOptions o;
  o.workers = 2;
  o.max_queue = 1u << 22;
  if (quotas_off) o.max_in_flight_per_user = 0;
  return o;
}

// Submit-to-ACK latency of a single thread.
LatencySummary bench_ack(int n) {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, engine_options());
  (void)engine.add_resource("r", 1u << 30);
  LatencyHistogram h;
  for (int i = 0; i < n; ++i) {
    auto copy = request("u" + std::to_string(i % 1000));  // many users, as real traffic has
    const auto t0 = steady::now();
    auto ack = engine.submit(std::move(copy));
    h.record(steady::now() - t0);
    if (!ack) std::abort();
  }
  while (engine.stats().in_flight > 0) std::this_thread::yield();
  return h.summary();
}

// Heap bytes kept per decided booking (malloc'd in all arenas, mallinfo2) by the engine, its
// MemoryStore and the LocalBus, over `n` bookings from 10,000 users who each booked once before:
// the booking's record, its booking/<id> topic with its events, its events in the user's history.
// What a server's heap grows by per booking until the bus forgets topics (LocalBusOptions) and the
// store's retention applies; on a VM each new page costs a fault of several microseconds.
double bench_kept(int n) {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, engine_options());
  (void)engine.add_resource("r", 1u << 30);
  constexpr int users = 10'000;
  auto settle = [&] {
    for (auto st = engine.stats(); st.in_flight > 0 || st.publish_backlog > 0; st = engine.stats())
      std::this_thread::yield();
  };
  for (int i = 0; i < users; ++i)
    if (!engine.submit(request("u" + std::to_string(i)))) std::abort();
  settle();
  const auto before = mallinfo2().uordblks;
  for (int i = 0; i < n; ++i)
    if (!engine.submit(request("u" + std::to_string(i % users)))) std::abort();
  settle();
  const auto after = mallinfo2().uordblks;
  return (static_cast<double>(after) - static_cast<double>(before)) / n;
}

// Submit to the decision event reaching a subscriber on the bus's delivery thread.
LatencySummary bench_decision(int n) {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, engine_options());
  (void)engine.add_resource("r", 1u << 30);
  LatencyHistogram h;
  std::atomic<int> decided{0};
  SubscribeOptions so;
  so.max_queue = 1u << 22;
  auto sub = bus->subscribe(
                    "user/*",
                    [&](const Delivery& d) {
                      const auto& o = d.event->data().as_object();
                      if (o.at("status").as_string() != "confirmed") return;
                      h.record(static_cast<std::uint64_t>(now_ns() - o.at("metadata").at("t").as_int64()));
                      ++decided;
                    },
                    so)
                 .value();
  for (int i = 0; i < n; ++i) {
    auto req = request("u" + std::to_string(i % 1000));
    req.metadata["t"] = now_ns();
    if (!engine.submit(std::move(req))) std::abort();
    // Paced: a new booking every ~50 us (20,000/s, a fifth of what the engine sustains), so
    // this measures latency, not queueing.
    pace(std::chrono::microseconds(50));
  }
  while (decided.load() < n) std::this_thread::yield();
  return h.summary();
}

// Bookings per second through the engine with two submitting threads.
double bench_throughput(int n) {
  auto bus = std::make_shared<LocalBus>();
  BookingEngine engine(bus, engine_options());
  (void)engine.add_resource("r", 1u << 30);
  const auto t0 = steady::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < n / 2; ++i) {
        const auto user = "u" + std::to_string(t) + "-" + std::to_string(i % 1000);
        while (!engine.submit(request(user))) std::this_thread::yield();  // overloaded: retry
      }
    });
  for (auto& th : threads) th.join();
  while (engine.stats().in_flight > 0) std::this_thread::yield();
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  return n / secs;
}

// Publish to callback latency for one subscriber.
LatencySummary bench_bus(int n) {
  LocalBus bus;
  LatencyHistogram h;
  std::atomic<int> got{0};
  auto sub = bus.subscribe("t/1",
                           [&](const Delivery& d) {
                             h.record(static_cast<std::uint64_t>(now_ns() - d.event->data().as_int64()));
                             ++got;
                           })
                 .value();
  for (int i = 0; i < n; ++i) {
    (void)bus.publish("t/1", boost::json::value(now_ns()));
    pace(std::chrono::microseconds(5));
  }
  while (got.load() < n) std::this_thread::yield();
  return h.summary();
}

// Deliveries per second to `subscribers` subscribers of one topic.
double bench_fanout(int subscribers, int events) {
  LocalBusOptions bo;
  bo.delivery_threads = 2;
  LocalBus bus(bo);
  std::atomic<std::int64_t> delivered{0};
  std::vector<Subscription> subs;
  subs.reserve(static_cast<std::size_t>(subscribers));
  SubscribeOptions so;
  so.snapshot = false;
  so.max_queue = static_cast<std::size_t>(events) + 1;
  for (int i = 0; i < subscribers; ++i)
    subs.push_back(
        bus.subscribe(
               "fan/out", [&](const Delivery&) { delivered.fetch_add(1, std::memory_order_relaxed); }, so)
            .value());
  const std::int64_t expected = std::int64_t{subscribers} * events;
  const auto t0 = steady::now();
  for (int i = 0; i < events; ++i) (void)bus.publish("fan/out", boost::json::object{{"i", i}});
  while (delivered.load(std::memory_order_relaxed) < expected) std::this_thread::yield();
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  return static_cast<double>(expected) / secs;
}

LatencySummary median_summary(std::vector<LatencySummary> runs) {
  std::sort(runs.begin(), runs.end(), [](const auto& a, const auto& b) { return a.p99_ns < b.p99_ns; });
  return runs[runs.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
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
    else if (a == "--subscribers")
      opt.subscribers = std::max(1, value());
    else if (a == "--json")
      opt.json = true;
    else if (a == "--only" && i + 1 < argc)
      opt.only = argv[++i];
    else if (a == "--no-quotas")
      quotas_off = true;
    else {
      fmt::print(
          stderr,
          "usage: pushbook-core-bench [--runs N] [--bookings N] [--subscribers N] [--only WHAT] [--json] "
          "[--no-quotas]\n");
      return a == "--help" ? 0 : 2;
    }
  }

  std::vector<LatencySummary> ack, decision, bus;
  std::vector<double> throughput, fanout, kept;
  for (int r = 0; r < opt.runs; ++r) {
    auto want = [&](std::string_view what) { return opt.only.empty() || opt.only == what; };
    ack.push_back(want("ack") ? bench_ack(opt.bookings) : LatencySummary{});
    decision.push_back(want("decision") ? bench_decision(opt.bookings / 10) : LatencySummary{});
    throughput.push_back(want("throughput") ? bench_throughput(opt.bookings) : 0.0);
    bus.push_back(want("bus") ? bench_bus(opt.bookings / 2) : LatencySummary{});
    fanout.push_back(want("fanout") ? bench_fanout(opt.subscribers, 200) : 0.0);
    kept.push_back(want("kept") ? bench_kept(opt.bookings / 10) : 0.0);
    if (!opt.json) fmt::print(stderr, "run {}/{} done\n", r + 1, opt.runs);
  }
  const auto a = median_summary(ack), d = median_summary(decision), b = median_summary(bus);
  const double tp = median(throughput), fo = median(fanout), kb = median(kept);
  const unsigned cores = std::thread::hardware_concurrency();

  if (opt.json) {
    auto lat = [](const LatencySummary& s) {
      return fmt::format(R"({{"p50_us":{:.2f},"p99_us":{:.2f},"p999_us":{:.2f},"max_us":{:.2f},"count":{}}})",
                         us(s.p50_ns), us(s.p99_ns), us(s.p999_ns), us(s.max_ns), s.count);
    };
    fmt::print(R"({{"runs":{},"cores":{},"ack":{},"decision":{},"bus_publish_to_delivery":{},)"
               R"("bookings_per_s":{:.0f},"fanout_subscribers":{},"fanout_deliveries_per_s":{:.0f},)"
               R"("kept_bytes_per_booking":{:.0f}}})"
               "\n",
               opt.runs, cores, lat(a), lat(d), lat(b), tp, opt.subscribers, fo, kb);
    return 0;
  }
  fmt::print("pushbook core benchmark: {} runs, medians shown, {} cores\n\n", opt.runs, cores);
  fmt::print("{:<44} {:>10} {:>10} {:>10}\n", "latency (us)", "p50", "p99", "p99.9");
  fmt::print("{:<44} {:>10.2f} {:>10.2f} {:>10.2f}\n", "submit -> ACK", us(a.p50_ns), us(a.p99_ns),
             us(a.p999_ns));
  fmt::print("{:<44} {:>10.2f} {:>10.2f} {:>10.2f}\n", "submit -> decision event at subscriber", us(d.p50_ns),
             us(d.p99_ns), us(d.p999_ns));
  fmt::print("{:<44} {:>10.2f} {:>10.2f} {:>10.2f}\n", "bus publish -> subscriber callback", us(b.p50_ns),
             us(b.p99_ns), us(b.p999_ns));
  fmt::print("\n{:<44} {:>10.0f}\n", "bookings/s through the engine (2 threads)", tp);
  fmt::print("{:<44} {:>10.0f}\n", fmt::format("fan-out deliveries/s ({} subscribers)", opt.subscribers), fo);
  fmt::print("{:<44} {:>10.0f}\n", "heap bytes kept per decided booking", kb);
  return 0;
}
