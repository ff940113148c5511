// pushbook-gateway-bench: the gateway end to end on loopback.
//
//   latency  N WebSocket clients (default 10,000) connected to a pushbook-server process; they
//            book at a steady aggregate rate with no business delay; book-to-confirmation time
//            is measured from each booking's *scheduled* send time (no coordinated omission).
//   exchange the latency mode's clients and rate with {"op":"ping"} instead of a booking: the
//            server CPU of one WebSocket request and response alone (no engine, no bus), the
//            floor under the latency mode's CPU per booking.
//            Both measure --seconds of load; --warmup S first runs the same load S seconds
//            unmeasured (a server past its first ~120,000 bookings: its bus's topic table full and
//            recycling, its heap grown), which a fresh server's first seconds are not.
//   fanout   one topic, 1,000 subscribers, ~110-byte events: deliveries per second and per
//            server CPU-second. The server is this program in a child process (--serve-fanout:
//            a gateway on 1 thread that publishes when told on stdin), so the clients' CPU is
//            not the server's.
//   handshakes  10,000 WebSocket upgrades (256 in flight) to a pushbook-server process on 1
//            gateway thread: upgrades per second, and per server CPU-second.
//   memory   server RSS growth per idle WebSocket subscribed to one topic (10,000 connections).
//
// --bus redis runs each mode over a RedisBus instead of the LocalBus: the bench starts a
// redis-server of its own on a free loopback port (tests/redis_server.hpp, no persistence, emptied
// before every measurement) and gives its address to pushbook-server (--bus redis://...) or to
// the in-process gateway (fanout). --bus both measures each mode over both buses in every run,
// one after the other, and prints the ratios.
//
//   pushbook-gateway-bench [--only latency|exchange|fanout|handshakes|memory] [--bus local|redis|both]
//   [--clients N]
//                          [--rate R] [--seconds S] [--warmup S] [--subscribers N] [--events N] [--runs N]
//                          [--json]
//                          [--server-arg ARG]...  (given to every pushbook-server it starts)
//                          [--server-env NAME=VALUE]...  (set in every server's environment, e.g.
//                          GLIBC_TUNABLES: the bench's own process keeps its environment)
#include <pushbook/auth.hpp>
#include <pushbook/metrics.hpp>
#include <pushbook/push_gateway.hpp>
#include <pushbook/redis_bus.hpp>

#include "redis_server.hpp"
#include "server_process.hpp"

#include <fmt/format.h>
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <sys/resource.h>
#include <unistd.h>
#include <csignal>
#include <cstdio>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

namespace net = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = net::ip::tcp;
using steady = std::chrono::steady_clock;
using namespace pushbook;

namespace {

const std::string secret = "bench-secret-of-at-least-32-bytes";

struct Options {
  std::string only;
  int clients = 10'000;
  int rate = 2'000;
  int seconds = 10;
  // latency and exchange: seconds of the same load before the measured ones, measured in nothing
  // (a long-running server's state: its topic table full and recycling, its heap grown).
  int warmup = 0;
  int subscribers = 1'000;
  int events = 20'000;
  bool serve_fanout = false;  // the child role of the fanout mode
  int runs = 3;
  bool json = false;
  std::string bus = "local";  // local, redis or both
};

// The bus one measurement runs over: "local", or "redis" with the address of the bench's Redis.
struct BusChoice {
  std::string kind = "local";
  std::string address;
};

void raise_fd_limit() {
  rlimit r{};
  getrlimit(RLIMIT_NOFILE, &r);
  r.rlim_cur = r.rlim_max;
  setrlimit(RLIMIT_NOFILE, &r);
}

// A pushbook-server child process on a free port (1 gateway thread, one big resource). The
// in-memory store: this benchmark measures the gateway (pushbook-store-bench and pushbook-bench
// measure the durable path), and it leaves no database file behind.
// More arguments for every pushbook-server the benchmark starts (--server-arg, repeatable).
std::vector<std::string> extra_server_args;

std::vector<std::string> server_args(const BusChoice& bus) {
  std::vector<std::string> args = {pushbook::bench::self_dir() + "/pushbook-server",
                                   "--port",
                                   "0",
                                   "--secret",
                                   secret,
                                   "--threads",
                                   "1",
                                   "--resource",
                                   "hall:100000000",
                                   "--store",
                                   "memory:"};
  if (bus.kind == "redis") {
    args.push_back("--bus");
    args.push_back(bus.address);
  }
  args.insert(args.end(), extra_server_args.begin(), extra_server_args.end());
  return args;
}

using ServerProcessBase = pushbook::bench::ServerProcess;

struct ServerProcess : pushbook::bench::ServerProcess {
  explicit ServerProcess(const BusChoice& bus) : pushbook::bench::ServerProcess(server_args(bus)) {}
  long rss_kib() const { return pushbook::bench::process_rss_kib(pid); }
  double cpu_seconds() const { return pushbook::bench::process_cpu_seconds(pid).value_or(0); }
  pushbook::bench::CpuSplit cpu_split() const {
    return pushbook::bench::process_cpu_split(pid).value_or(pushbook::bench::CpuSplit{});
  }
  pushbook::bench::ContextSwitches context_switches() const {
    return pushbook::bench::process_context_switches(pid).value_or(pushbook::bench::ContextSwitches{});
  }
};

// One WebSocket client connection, asynchronous. `on_line` sees every message line.
struct Conn : std::enable_shared_from_this<Conn> {
  websocket::stream<beast::tcp_stream> ws;
  beast::flat_buffer buffer;
  std::function<void(Conn&, std::string_view)> on_line;
  std::deque<std::string> out;
  bool writing = false;
  bool open = false;
  int index = 0;
  steady::time_point sent_at;  // scheduled time of the booking in flight
  bool waiting = false;

  explicit Conn(net::io_context& ioc) : ws(net::make_strand(ioc)) {}

  void start(const tcp::endpoint& ep, const std::string& token, std::function<void(bool)> done) {
    beast::get_lowest_layer(ws).expires_after(std::chrono::seconds(30));
    beast::get_lowest_layer(ws).async_connect(
        ep, [self = shared_from_this(), ep, token, done](beast::error_code ec) {
          if (ec) return done(false);
          beast::get_lowest_layer(self->ws).expires_never();
          self->ws.set_option(websocket::stream_base::decorator([token](websocket::request_type& req) {
            req.set(beast::http::field::authorization, "Bearer " + token);
          }));
          self->ws.async_handshake("127.0.0.1", "/v1/ws", [self, done](beast::error_code hec) {
            if (hec) return done(false);
            self->open = true;
            self->read();
            done(true);
          });
        });
  }
  void read() {
    ws.async_read(buffer, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) {
        self->open = false;
        return;
      }
      const auto data = beast::buffers_to_string(self->buffer.data());
      self->buffer.consume(self->buffer.size());
      std::string_view rest = data;
      while (!rest.empty()) {
        const auto nl = rest.find('\n');
        if (self->on_line) self->on_line(*self, rest.substr(0, nl));
        rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
      }
      self->read();
    });
  }
  void send(std::string text) {  // on the connection's strand
    out.push_back(std::move(text));
    write();
  }
  void write() {
    if (writing || out.empty()) return;
    writing = true;
    ws.async_write(net::buffer(out.front()), [self = shared_from_this()](beast::error_code, std::size_t) {
      self->out.pop_front();
      self->writing = false;
      self->write();
    });
  }
};

// Connects `n` clients; returns them once all are open. The tokens are signed first, so that
// `seconds` (when given) is the time of the connections and upgrades alone.
std::vector<std::shared_ptr<Conn>> connect_all(net::io_context& ioc, std::uint16_t port, int n,
                                               const std::function<void(Conn&, std::string_view)>& on_line,
                                               double* seconds = nullptr) {
  const tcp::endpoint ep(net::ip::make_address("127.0.0.1"), port);
  std::vector<std::string> tokens;
  for (int i = 0; i < n; ++i)
    tokens.push_back(sign_token("u" + std::to_string(i),
                                std::chrono::system_clock::now() + std::chrono::hours(1), secret));
  std::vector<std::shared_ptr<Conn>> conns;
  std::atomic<int> done{0}, ok{0};
  // At most 256 handshakes in flight: a burst of 10,000 SYNs overflows the listen backlog.
  std::atomic<int> next{0};
  std::function<void()> launch = [&] {
    const int i = next.fetch_add(1);
    if (i >= n) return;
    auto c = conns[static_cast<std::size_t>(i)];
    c->start(ep, tokens[static_cast<std::size_t>(i)], [&](bool success) {
      if (success) ++ok;
      launch();  // before `done`: the caller returns (and its locals go) once done == n
      ++done;
    });
  };
  for (int i = 0; i < n; ++i) {
    conns.push_back(std::make_shared<Conn>(ioc));
    conns.back()->index = i;
    conns.back()->on_line = on_line;
  }
  const auto t0 = steady::now();
  net::post(ioc, [&] {
    for (int i = 0; i < 256; ++i) launch();
  });
  while (done.load() < n) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  if (seconds) *seconds = std::chrono::duration<double>(steady::now() - t0).count();
  if (ok.load() != n) throw std::runtime_error(fmt::format("only {} of {} clients connected", ok.load(), n));
  return conns;
}

struct LatencyResult {
  LatencySummary latency;
  std::uint64_t bookings = 0;
  double server_cpu_per_booking_us = 0;
  double server_user_us = 0, server_system_us = 0;  // its split: user space, kernel
  // The server's context switches per booking: waits (voluntary) and preemptions (involuntary).
  double voluntary_switches = 0, involuntary_switches = 0;
  // With a warm-up of at least --seconds: the same server's CPU per booking over its first
  // --seconds (fresh, as a run without warm-up measures it), in the same run. 0 otherwise.
  double first_cpu_per_booking_us = 0;
};

// `ping`: the exchange mode: the same clients at the same rate send {"op":"ping"} and wait for
// its reply instead of booking. Its server CPU per exchange is what one WebSocket request and
// response cost the gateway without the engine or the bus: the floor under a pushed booking.
LatencyResult bench_latency(const Options& o, const BusChoice& bus, bool ping = false) {
  ServerProcess server(bus);
  net::io_context ioc(1);
  auto guard = net::make_work_guard(ioc);
  std::thread io([&] { ioc.run(); });
  LatencyHistogram hist;
  std::atomic<std::uint64_t> decided{0}, decided_first{0};
  // Set below, before the first booking goes out.
  steady::time_point measured_from{}, first_until{};
  auto conns = connect_all(ioc, server.port, o.clients, [&](Conn& c, std::string_view line) {
    if (!c.waiting) return;
    if (ping) {
      if (line.find("\"pong\":true") == std::string_view::npos) return;
    } else {
      // Only the decision matters here: the first booking event whose status is final.
      if (line.find("\"type\":\"event\"") == std::string_view::npos) return;
      if (line.find("\"status\":\"confirmed\"") == std::string_view::npos &&
          line.find("\"status\":\"rejected\"") == std::string_view::npos)
        return;
    }
    c.waiting = false;
    if (c.sent_at < first_until) ++decided_first;
    if (c.sent_at < measured_from) return;  // a warm-up booking
    hist.record(steady::now() - c.sent_at);
    ++decided;
    // "follow":"decision": the server ends the booking's subscription after the decision, so the
    // connection holds none between bookings and sends no unsubscribe.
  });
  // Steady aggregate rate: every tick, the bookings scheduled since the last tick go out, each
  // stamped with its scheduled time. The warm-up's bookings go out the same way and are counted in
  // nothing: the measured ones are those scheduled from `measured_from` on.
  const auto interval = std::chrono::nanoseconds(1'000'000'000LL / o.rate);
  const auto start = steady::now();
  measured_from = start + std::chrono::seconds(o.warmup);
  const auto end = measured_from + std::chrono::seconds(o.seconds);
  const bool first_window = o.warmup > 0 && o.warmup >= o.seconds;
  if (first_window) first_until = start + std::chrono::seconds(o.seconds);
  const auto cpu_at_start = server.cpu_split();
  std::uint64_t scheduled = 0;
  net::steady_timer tick(ioc);
  std::function<void()> on_tick = [&] {
    const auto now = steady::now();
    while (start + interval * static_cast<long>(scheduled) <= std::min(now, end)) {
      auto& c = *conns[scheduled % conns.size()];
      const auto at = start + interval * static_cast<long>(scheduled);
      ++scheduled;
      if (c.waiting) continue;  // still waiting for its last one: skip (rare at these rates)
      c.waiting = true;
      c.sent_at = at;
      net::dispatch(c.ws.get_executor(), [&c, ping] {
        c.send(ping ? R"({"id":1,"op":"ping"})"
                    : R"({"id":1,"op":"book","resource":"hall","follow":"decision"})");
      });
    }
    if (now < end) {
      tick.expires_after(std::chrono::microseconds(200));
      tick.async_wait([&](beast::error_code) { on_tick(); });
    }
  };
  double r_first_cpu_us = 0;
  net::post(ioc, on_tick);
  // The server's counts are read on this thread, at the end of the first window and at the first
  // measured booking's scheduled time (the clients' thread keeps its schedule meanwhile).
  if (first_window) {
    std::this_thread::sleep_until(first_until);
    const auto cpu = server.cpu_split();
    // Bookings of the window decided after its end are few (p99 ~1 ms at 2,000/s).
    r_first_cpu_us = (cpu.user + cpu.system - cpu_at_start.user - cpu_at_start.system) * 1e6 /
                     static_cast<double>(std::max<std::uint64_t>(1, decided_first.load()));
  }
  std::this_thread::sleep_until(measured_from);
  const auto cpu_before = server.cpu_split();
  const auto switches_before = server.context_switches();
  while (steady::now() < end + std::chrono::seconds(2))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  LatencyResult r;
  r.first_cpu_per_booking_us = r_first_cpu_us;
  r.latency = hist.summary();
  r.bookings = decided.load();
  const auto cpu_after = server.cpu_split();
  const auto per_booking = 1e6 / static_cast<double>(std::max<std::uint64_t>(1, r.bookings));
  r.server_user_us = (cpu_after.user - cpu_before.user) * per_booking;
  r.server_system_us = (cpu_after.system - cpu_before.system) * per_booking;
  r.server_cpu_per_booking_us = r.server_user_us + r.server_system_us;
  const auto switches_after = server.context_switches();
  // As doubles: a server thread that exits during the run takes its counts with it.
  r.voluntary_switches =
      (static_cast<double>(switches_after.voluntary) - static_cast<double>(switches_before.voluntary)) *
      per_booking / 1e6;
  r.involuntary_switches =
      (static_cast<double>(switches_after.involuntary) - static_cast<double>(switches_before.involuntary)) *
      per_booking / 1e6;
  for (auto& c : conns) net::post(c->ws.get_executor(), [c] { beast::get_lowest_layer(c->ws).close(); });
  guard.reset();
  ioc.stop();
  io.join();
  return r;
}

std::shared_ptr<EventBus> make_bus(const BusChoice& choice) {
  if (choice.kind == "local") return std::make_shared<LocalBus>();
  RedisBusOptions ro;
  ro.address = choice.address;
  auto bus = std::make_shared<RedisBus>(ro);
  if (!bus->wait_connected(std::chrono::seconds(10)))
    throw std::runtime_error("Redis at " + choice.address + " does not answer");
  return bus;
}

// The fanout mode's server (this program run with --serve-fanout): a gateway on one thread over
// the chosen bus, printing its port; each number read on stdin publishes that many events on
// resource/fan. Ends at the end of its input.
int serve_fanout(const BusChoice& choice) {
  auto bus = make_bus(choice);
  auto engine = std::make_shared<BookingEngine>(bus);
  GatewayOptions go;
  go.secret = secret;
  go.threads = 1;
  go.log = [](LogLevel, std::string_view) {};
  PushGateway gw(bus, engine, go);
  const auto port = gw.listen();
  if (!port) {
    fmt::print(stderr, "cannot listen: {}\n", port.error().message);
    return 1;
  }
  fmt::print("listening on http://127.0.0.1:{}\n", *port);
  std::fflush(stdout);
  // An event of ~110 bytes on the wire, as the issue's comparison used.
  const std::string pad(28, 'x');
  std::uint64_t n = 0;
  std::string line;
  // publish_async on both buses: a publisher of a burst does not wait for each event (RedisBus
  // pipelines them, as the bus-bench's throughput figure does; LocalBus publishes inline).
  auto failed = std::make_shared<std::atomic<std::uint64_t>>(0);  // outlives the bus's callbacks
  while (std::getline(std::cin, line)) {
    const int count = std::stoi(line);
    for (int k = 0; k < count; ++k)
      bus->publish_async(
          "resource/fan",
          std::make_shared<const boost::json::value>(boost::json::object{{"n", ++n}, {"pad", pad}}),
          [failed](result<EventPtr> r) {
            if (!r) failed->fetch_add(1, std::memory_order_relaxed);
          });
  }
  if (failed->load() != 0) fmt::print(stderr, "{} publishes failed\n", failed->load());
  gw.stop();
  return 0;
}

struct FanoutResult {
  double per_second = 0;             // deliveries per wall-clock second
  double per_server_cpu_second = 0;  // deliveries per second of the server process's CPU
};

FanoutResult bench_fanout(const Options& o, const BusChoice& choice) {
  std::vector<std::string> args = {pushbook::bench::self_dir() + "/pushbook-gateway-bench", "--serve-fanout",
                                   "--bus", choice.kind == "redis" ? choice.address : "local"};
  ServerProcessBase server(args, /*with_input=*/true);
  net::io_context ioc(1);
  auto guard = net::make_work_guard(ioc);
  std::thread io([&] { ioc.run(); });
  std::atomic<std::uint64_t> delivered{0};
  std::atomic<int> subscribed{0};
  auto conns = connect_all(ioc, server.port, o.subscribers, [&](Conn&, std::string_view line) {
    if (line.starts_with(R"({"type":"event")"))
      delivered.fetch_add(1, std::memory_order_relaxed);
    else if (line.starts_with(R"({"type":"reply")"))
      subscribed.fetch_add(1);
  });
  for (auto& c : conns)
    net::post(c->ws.get_executor(), [c] { c->send(R"({"id":1,"op":"subscribe","topic":"resource/fan"})"); });
  while (subscribed.load() < o.subscribers) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  // A subscription's snapshot event (nothing published yet: none) must not count.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  delivered = 0;
  const std::uint64_t expected =
      static_cast<std::uint64_t>(o.events) * static_cast<std::uint64_t>(o.subscribers);
  const auto t0 = steady::now();
  const double cpu0 = pushbook::bench::process_cpu_seconds(server.pid).value_or(0);
  // Bursts of 500, at most two outstanding: each connection's queue stays well under its bound
  // and the server always has the next burst.
  constexpr int burst = 500;
  for (int i = 0; i < o.events; i += burst) {
    if (!server.send_line(std::to_string(std::min(burst, o.events - i))))
      throw std::runtime_error("the fan-out server went away");
    const auto need = static_cast<std::uint64_t>(std::max(0, i - burst)) * o.subscribers;
    while (delivered.load(std::memory_order_relaxed) < need && steady::now() - t0 < std::chrono::seconds(120))
      std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  while (delivered.load() < expected && steady::now() - t0 < std::chrono::seconds(120))
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  const double secs = std::chrono::duration<double>(steady::now() - t0).count();
  const double cpu = pushbook::bench::process_cpu_seconds(server.pid).value_or(0) - cpu0;
  if (delivered.load() < expected)
    throw std::runtime_error(fmt::format("only {} of {} deliveries arrived", delivered.load(), expected));
  for (auto& c : conns) net::post(c->ws.get_executor(), [c] { beast::get_lowest_layer(c->ws).close(); });
  guard.reset();
  ioc.stop();
  io.join();
  return {static_cast<double>(expected) / secs, static_cast<double>(expected) / std::max(cpu, 1e-9)};
}

struct HandshakeResult {
  double per_second = 0;             // upgrades completed per wall-clock second
  double per_server_cpu_second = 0;  // per second of the server process's CPU
};

HandshakeResult bench_handshakes(const Options& o, const BusChoice& bus) {
  ServerProcess server(bus);
  net::io_context ioc(1);
  auto guard = net::make_work_guard(ioc);
  std::thread io([&] { ioc.run(); });
  const double cpu0 = server.cpu_seconds();
  double secs = 0;
  auto conns = connect_all(ioc, server.port, o.clients, {}, &secs);
  const double cpu = server.cpu_seconds() - cpu0;
  for (auto& c : conns) net::post(c->ws.get_executor(), [c] { beast::get_lowest_layer(c->ws).close(); });
  guard.reset();
  ioc.stop();
  io.join();
  return {o.clients / secs, o.clients / std::max(cpu, 1e-9)};
}

double bench_memory(const Options& o, const BusChoice& bus) {
  ServerProcess server(bus);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  const long before = server.rss_kib();
  net::io_context ioc(1);
  auto guard = net::make_work_guard(ioc);
  std::thread io([&] { ioc.run(); });
  std::atomic<int> subscribed{0};
  auto conns = connect_all(ioc, server.port, o.clients, [&](Conn&, std::string_view line) {
    if (line.starts_with(R"({"type":"reply")")) subscribed.fetch_add(1);
  });
  // Idle and subscribed: every connection follows the same topic, as 10,000 clients of a hall.
  for (auto& c : conns)
    net::post(c->ws.get_executor(), [c] { c->send(R"({"id":1,"op":"subscribe","topic":"resource/hall"})"); });
  const auto give_up = steady::now() + std::chrono::seconds(60);
  while (subscribed.load() < o.clients && steady::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (subscribed.load() < o.clients)
    throw std::runtime_error(
        fmt::format("only {} of {} subscriptions answered", subscribed.load(), o.clients));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const long after = server.rss_kib();
  for (auto& c : conns) net::post(c->ws.get_executor(), [c] { beast::get_lowest_layer(c->ws).close(); });
  guard.reset();
  ioc.stop();
  io.join();
  return static_cast<double>(after - before) * 1024.0 / o.clients;
}

template <class T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class R>
double median_of(const std::vector<R>& runs, double R::*field) {
  std::vector<double> v;
  for (const auto& r : runs) v.push_back(r.*field);
  return median(v);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
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
    else if (a == "--clients")
      o.clients = std::stoi(value());
    else if (a == "--rate")
      o.rate = std::stoi(value());
    else if (a == "--seconds")
      o.seconds = std::stoi(value());
    else if (a == "--warmup")
      o.warmup = std::stoi(value());
    else if (a == "--subscribers")
      o.subscribers = std::stoi(value());
    else if (a == "--events")
      o.events = std::stoi(value());
    else if (a == "--runs")
      o.runs = std::stoi(value());
    else if (a == "--json")
      o.json = true;
    else if (a == "--bus")
      o.bus = value();
    else if (a == "--serve-fanout")
      o.serve_fanout = true;
    else if (a == "--server-arg")
      extra_server_args.push_back(value());
    else if (a == "--server-env") {
      auto entry = value();
      if (entry.find('=') == std::string::npos || entry.front() == '=') {
        fmt::print(stderr, "--server-env is NAME=VALUE, not '{}'\n", entry);
        return 2;
      }
      pushbook::bench::set_server_env(std::move(entry));
    } else {
      fmt::print(stderr,
                 "usage: pushbook-gateway-bench [--only latency|exchange|fanout|handshakes|memory]\n"
                 "                              [--bus local|redis|both]\n"
                 "                              [--clients N] [--rate R] [--seconds S] [--warmup S]\n"
                 "                              [--subscribers N]\n"
                 "                              [--events N] [--runs N] [--json]\n"
                 "                              [--server-arg ARG]...   (to pushbook-server)\n"
                 "                              [--server-env NAME=VALUE]...   (its environment)\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (o.serve_fanout)  // the fanout mode's child: --bus is "local" or the Redis address
    return serve_fanout(o.bus == "local" ? BusChoice{"local", ""} : BusChoice{"redis", o.bus});
  if (!o.only.empty() && o.only != "latency" && o.only != "exchange" && o.only != "fanout" &&
      o.only != "handshakes" && o.only != "memory") {
    fmt::print(stderr, "--only is latency, exchange, fanout, handshakes or memory, not '{}'\n", o.only);
    return 2;
  }
  if (o.warmup < 0) {
    fmt::print(stderr, "--warmup is a number of seconds, 0 or more, not {}\n", o.warmup);
    return 2;
  }
  if (o.bus != "local" && o.bus != "redis" && o.bus != "both") {
    fmt::print(stderr, "--bus is local, redis or both, not '{}'\n", o.bus);
    return 2;
  }
  raise_fd_limit();
  std::signal(SIGPIPE, SIG_IGN);
  auto want = [&](std::string_view what) { return o.only.empty() || o.only == what; };
  std::unique_ptr<pushbook::test::RedisServer> redis;
  std::vector<BusChoice> buses;
  if (o.bus != "redis") buses.push_back({"local", ""});
  if (o.bus != "local") {
    redis = std::make_unique<pushbook::test::RedisServer>();
    buses.push_back({"redis", redis->address()});
  }
  std::map<std::string, std::vector<LatencyResult>> lat, exchange;
  std::map<std::string, std::vector<FanoutResult>> fan;
  std::map<std::string, std::vector<HandshakeResult>> shakes;
  std::map<std::string, std::vector<double>> mem;
  // Every run measures each bus in turn, so that a slow minute of the VM hits both.
  for (int r = 0; r < o.runs; ++r) {
    for (const auto& bus : buses) {
      // Nothing of an earlier measurement (histories, last values) may reach this one.
      auto flush = [&] {
        if (redis) (void)redis->command({"FLUSHALL"});
      };
      if (want("latency")) {
        flush();
        lat[bus.kind].push_back(bench_latency(o, bus));
      }
      if (want("exchange")) {
        flush();
        exchange[bus.kind].push_back(bench_latency(o, bus, /*ping=*/true));
      }
      if (want("fanout")) {
        flush();
        fan[bus.kind].push_back(bench_fanout(o, bus));
      }
      if (want("handshakes")) {
        flush();
        shakes[bus.kind].push_back(bench_handshakes(o, bus));
      }
      if (want("memory")) {
        flush();
        mem[bus.kind].push_back(bench_memory(o, bus));
      }
    }
    if (!o.json) fmt::print(stderr, "run {}/{} done\n", r + 1, o.runs);
  }
  const std::string warmed = o.warmup > 0 ? fmt::format(" after {} s of warm-up", o.warmup) : "";
  for (const auto& bus : buses) {
    const auto& kind = bus.kind;
    const std::string over = buses.size() > 1 || kind != "local" ? fmt::format(" [bus {}]", kind) : "";
    if (auto& runs = lat[kind]; !runs.empty()) {
      std::sort(runs.begin(), runs.end(),
                [](const auto& a, const auto& b) { return a.latency.p99_ns < b.latency.p99_ns; });
      const auto& m = runs[runs.size() / 2];
      fmt::print(
          "book -> confirmation, {} WebSocket clients, {} bookings/s for {} s{} (median of {} runs){}:\n",
          o.clients, o.rate, o.seconds, warmed, runs.size(), over);
      fmt::print(
          "  bookings {}  p50 {:.3f} ms  p90 {:.3f} ms  p99 {:.3f} ms  max {:.3f} ms  server CPU {:.1f} "
          "us/booking (user {:.1f}, system {:.1f})\n",
          m.bookings, m.latency.p50_ns / 1e6, m.latency.p90_ns / 1e6, m.latency.p99_ns / 1e6,
          m.latency.max_ns / 1e6, m.server_cpu_per_booking_us, m.server_user_us, m.server_system_us);
      fmt::print("  server context switches per booking (that run): {:.2f} voluntary, {:.2f} involuntary\n",
                 m.voluntary_switches, m.involuntary_switches);
      std::string each;
      for (const auto& x : runs)
        each += fmt::format("{}{:.3f}", each.empty() ? "" : ", ", x.latency.p99_ns / 1e6);
      fmt::print("  p99 of each run, sorted: {} ms\n", each);
      std::vector<double> cpu;
      for (const auto& x : runs) cpu.push_back(x.server_cpu_per_booking_us);
      std::sort(cpu.begin(), cpu.end());
      each.clear();
      for (const auto x : cpu) each += fmt::format("{}{:.1f}", each.empty() ? "" : ", ", x);
      fmt::print("  server CPU per booking of each run, sorted: {} us (median {:.1f})\n", each, median(cpu));
      if (o.warmup > 0 && o.warmup >= o.seconds) {
        // Each run's pair: the same server's first seconds against its measured ones.
        std::vector<double> first;
        each.clear();
        for (const auto& x : runs) {
          first.push_back(x.first_cpu_per_booking_us);
          each += fmt::format("{}{:.1f} -> {:.1f}", each.empty() ? "" : ", ", x.first_cpu_per_booking_us,
                              x.server_cpu_per_booking_us);
        }
        fmt::print(
            "  the same servers' first {} s (fresh) -> measured {} s, CPU per booking: {} us (median of "
            "the first {:.1f})\n",
            o.seconds, o.seconds, each, median(first));
      }
    }
    if (auto& runs = exchange[kind]; !runs.empty()) {
      std::sort(runs.begin(), runs.end(), [](const auto& a, const auto& b) {
        return a.server_cpu_per_booking_us < b.server_cpu_per_booking_us;
      });
      const auto& m = runs[runs.size() / 2];
      std::string each;
      for (const auto& x : runs)
        each += fmt::format("{}{:.1f}", each.empty() ? "" : ", ", x.server_cpu_per_booking_us);
      fmt::print(
          "ping -> pong (the floor of one request and response), {} WebSocket clients, {} exchanges/s for {} "
          "s{} "
          "(median of {} runs){}:\n  exchanges {}  p50 {:.3f} ms  p99 {:.3f} ms  server CPU {:.1f} "
          "us/exchange "
          "(each run, sorted: {})\n",
          o.clients, o.rate, o.seconds, warmed, runs.size(), over, m.bookings, m.latency.p50_ns / 1e6,
          m.latency.p99_ns / 1e6, m.server_cpu_per_booking_us, each);
    }
    if (const auto& runs = fan[kind]; !runs.empty()) {
      std::vector<double> wall, cpu;
      std::string each;
      for (const auto& x : runs) {
        wall.push_back(x.per_second);
        cpu.push_back(x.per_server_cpu_second);
        each += fmt::format("{}{:.0f}", each.empty() ? "" : ", ", x.per_server_cpu_second);
      }
      fmt::print(
          "fan-out, 1 topic, {} subscribers, {} events: {:.0f} deliveries per server CPU-second (median of "
          "{} "
          "runs: {}), {:.0f} deliveries/s{}\n",
          o.subscribers, o.events, median(cpu), runs.size(), each, median(wall), over);
    }
    if (const auto& runs = shakes[kind]; !runs.empty()) {
      std::vector<double> wall, cpu;
      std::string each;
      for (const auto& x : runs) {
        wall.push_back(x.per_second);
        cpu.push_back(x.per_server_cpu_second);
        each += fmt::format("{}{:.0f}", each.empty() ? "" : ", ", x.per_second);
      }
      fmt::print(
          "WebSocket handshakes, {} connections, 256 in flight, 1 gateway thread: {:.0f}/s (median of {} "
          "runs: "
          "{}), {:.0f} per server CPU-second{}\n",
          o.clients, median(wall), runs.size(), each, median(cpu), over);
    }
    if (const auto& runs = mem[kind]; !runs.empty())
      fmt::print(
          "server memory per idle WebSocket subscribed to one topic ({} connections): {:.0f} bytes (median "
          "of {} "
          "runs){}\n",
          o.clients, median(runs), runs.size(), over);
  }
  if (buses.size() == 2) {
    if (!fan["local"].empty())
      fmt::print("fan-out per server CPU-second redis/local: {:.3f}\n",
                 median_of(fan["redis"], &FanoutResult::per_server_cpu_second) /
                     median_of(fan["local"], &FanoutResult::per_server_cpu_second));
    if (!lat["local"].empty())
      fmt::print("book -> confirmation p99 redis/local: {:.3f}\n",
                 static_cast<double>(lat["redis"][lat["redis"].size() / 2].latency.p99_ns) /
                     static_cast<double>(lat["local"][lat["local"].size() / 2].latency.p99_ns));
  }
  return 0;
}
