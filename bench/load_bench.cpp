// pushbook-bench: the case study's comparison, measured. N simulated users make bookings against a
// pushbook server, every mode measured the same way, from the moment a booking is meant to start
// to the moment the client *knows* its decision:
//
//   poll      POST /v1/bookings, then GET /v1/bookings/<id> every --interval-ms until the state is
//             final (the legacy flow); --connection close opens a new TCP connection per request
//   longpoll  POST, then GET /v1/bookings/<id>?wait=25 until final
//   sse       one Server-Sent Events stream per user on user/<id>; POST to book, decision pushed
//   push      one WebSocket per user; "book" over it, decision pushed
//
// Closed model (default): each user makes --bookings-per-user bookings one after another (users
// start spread over --ramp-ms). Arrival-rate model (--rate R --duration S): bookings are scheduled
// at R per second whatever the server does, spread over the users, and latency counts from the
// scheduled time, so a slow server cannot hide its queueing (no coordinated omission).
//
// Without --url it starts pushbook-server itself on a free port (with --decision-delay-ms as the
// simulated business step and --capacity as the resource's capacity). Server CPU per booking comes
// from /proc/<pid>/stat of a local server (found by its listening port, or --server-pid: several
// processes and their descendants, e.g. a cluster's nodes, nginx, Redis and PostgreSQL).
//
// Run with --help for every option. --json prints one JSON object (docs/benchmarks.md).
#include <pushbook/auth.hpp>
#include <pushbook/metrics.hpp>

#include <fmt/format.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <boost/beast/websocket.hpp>
#include <boost/beast/websocket/ssl.hpp>
#include <boost/json.hpp>
#include <boost/url/parse.hpp>

#include <dirent.h>
#include <poll.h>
#include <sys/resource.h>
#include <unistd.h>
#include <array>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

namespace pushbook::bench {
std::uint64_t tcp_bytes(int fd);  // tcp_bytes.cpp
}
#include "server_process.hpp"

namespace {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace json = boost::json;
namespace ssl = net::ssl;
using tcp = net::ip::tcp;
using steady = std::chrono::steady_clock;
using PlainStream = beast::tcp_stream;
using TlsStream = beast::ssl_stream<beast::tcp_stream>;
template <class Stream>
constexpr bool is_tls = std::is_same_v<Stream, TlsStream>;
using net::awaitable;
using net::use_awaitable;
using pushbook::bench::process_tree_cpu_seconds;
using pushbook::bench::self_dir;
using pushbook::bench::ServerProcess;
using pushbook::bench::tcp_bytes;
using pushbook::bench::TempDir;

enum class Mode { poll, longpoll, sse, push };

struct Options {
  std::string url;
  std::string ca_file;    // --ca: trust this CA for https/wss
  bool insecure = false;  // --insecure: no certificate check
  std::string tls_cert;   // --tls-cert/--tls-key: the server this bench starts speaks TLS only
  std::string tls_key;
  Mode mode = Mode::push;
  bool new_connection = false;  // --connection close
  int users = 100;
  int bookings_per_user = 5;
  int interval_ms = 500;
  std::string secret;
  double rate = 0;  // arrival-rate model when > 0
  double duration_s = 10;
  double warmup_s = 0;
  int ramp_ms = 1000;
  int think_ms = 0;
  int timeout_ms = 30'000;
  std::string resource = "bench";
  // Only used when the bench starts the server itself.
  int decision_delay_ms = 0;
  int decision_jitter_ms = 0;
  long capacity = 100'000'000;
  int server_threads = 1;
  int server_workers = 1;
  std::string server_path;
  std::string store;              // empty: the server's default kind (SQLite) in a temporary directory
  std::vector<long> server_pids;  // with their descendants
  int client_threads = 1;
  std::uint64_t seed = 0;
  bool json = false;
  bool progress = true;
};

std::string_view mode_name(Mode m) {
  switch (m) {
    case Mode::poll: return "poll";
    case Mode::longpoll: return "longpoll";
    case Mode::sse: return "sse";
    case Mode::push: return "push";
  }
  return "?";
}

[[noreturn]] void usage(int code) {
  fmt::print(code ? stderr : stdout,
             R"(usage: pushbook-bench [--url http(s)://HOST:PORT] [--mode poll|longpoll|sse|push]
                      [--users N] [--bookings-per-user K] [--interval-ms MS] [--secret S] [--json]
options:
  --url URL              server to load; without it pushbook-bench starts pushbook-server itself.
                         https://: every connection speaks TLS (wss for push)
  --ca FILE              PEM CA to trust for https (default: the system's)
  --insecure             no certificate check (a self-signed test server)
  --mode M               poll (default interval 500 ms), longpoll, sse or push (default push)
  --connection C         keep-alive (default) or close: a new TCP (and TLS) connection per HTTP
                         request (each TLS connection a full handshake: no session resumption)
  --users N              concurrent users (default 100)
  --bookings-per-user K  closed model: bookings each user makes one after another (default 5)
  --rate R               arrival-rate model: R bookings/s in all, for --duration seconds
  --duration S           length of an arrival-rate run (default 10)
  --warmup S             bookings meant to start in the first S seconds are not measured
  --ramp-ms MS           users start (connect) spread over this long (default 1000)
  --think-ms MS          closed model: pause between a user's bookings (default 0)
  --interval-ms MS       poll interval (default 500)
  --timeout-ms MS        a booking with no decision after this long is a timeout (default 30000)
  --resource ID          resource to book (default bench)
  --secret S             HS256 secret for user tokens (default: $PUSHBOOK_SECRET; made up when
                         the bench starts the server)
  --server-pid PID[,PID...]  server processes for CPU accounting, each with its descendants
                         (a cluster: nodes, nginx, Redis, PostgreSQL; default: the process
                         listening on --url's port)
  --client-threads N     load generator threads (default 1)
  --seed N               seed for the users' start offsets (default: random, printed)
  --json                 print one JSON object instead of the table
  --no-progress          no progress bar (it is drawn on stderr only when stderr is a terminal)
when it starts the server itself:
  --decision-delay-ms MS the server's simulated business step (default 0)
  --decision-jitter-ms J plus a uniform random 0..J ms (default 0)
  --capacity N           the resource's capacity (default 100000000; small values make rejections)
  --server-threads N     gateway threads (default 1)   --server-workers N  engine workers (default 1)
  --server PATH          pushbook-server binary (default: next to pushbook-bench)
  --store URL            the server's store (default: the server's default kind, a SQLite file,
                         in a temporary directory removed afterwards; memory: for none)
  --tls-cert F --tls-key K   the server speaks TLS only with this certificate and key (give
                         --ca or --insecure for the clients)
)");
  std::exit(code);
}

// "--server-pid 12,345,678": process ids, each at least 1.
std::vector<long> pid_list(const std::string& text) {
  std::vector<long> pids;
  std::size_t at = 0;
  while (at <= text.size()) {
    const auto comma = std::min(text.find(',', at), text.size());
    const auto item = text.substr(at, comma - at);
    char* end = nullptr;
    const long pid = std::strtol(item.c_str(), &end, 10);
    if (item.empty() || *end || pid < 1) {
      fmt::print(stderr, "--server-pid needs process ids separated by commas, not '{}'\n", text);
      usage(2);
    }
    pids.push_back(pid);
    at = comma + 1;
  }
  return pids;
}

Options parse(int argc, char** argv) {
  Options o;
  if (const char* s = std::getenv("PUSHBOOK_SECRET")) o.secret = s;
  o.seed = std::random_device{}();
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        fmt::print(stderr, "pushbook-bench: {} needs a value\n", a);
        usage(2);
      }
      return argv[++i];
    };
    auto number = [&](double min) -> double {
      const auto v = value();
      char* end = nullptr;
      const double n = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || !(n >= min)) {
        fmt::print(stderr, "pushbook-bench: {} needs a number >= {}, not '{}'\n", a, min, v);
        usage(2);
      }
      return n;
    };
    auto integer = [&](double min) {
      const double n = number(min);
      if (n > 1e9) {
        fmt::print(stderr, "pushbook-bench: {} is at most 1000000000, not {}\n", a, n);
        usage(2);
      }
      return static_cast<int>(n);
    };
    if (a == "--url")
      o.url = value();
    else if (a == "--ca")
      o.ca_file = value();
    else if (a == "--insecure")
      o.insecure = true;
    else if (a == "--tls-cert")
      o.tls_cert = value();
    else if (a == "--tls-key")
      o.tls_key = value();
    else if (a == "--mode") {
      const auto m = value();
      if (m == "poll")
        o.mode = Mode::poll;
      else if (m == "longpoll")
        o.mode = Mode::longpoll;
      else if (m == "sse")
        o.mode = Mode::sse;
      else if (m == "push")
        o.mode = Mode::push;
      else {
        fmt::print(stderr, "pushbook-bench: --mode is poll, longpoll, sse or push, not '{}'\n", m);
        usage(2);
      }
    } else if (a == "--connection") {
      const auto c = value();
      if (c != "keep-alive" && c != "close") {
        fmt::print(stderr, "pushbook-bench: --connection is keep-alive or close, not '{}'\n", c);
        usage(2);
      }
      o.new_connection = c == "close";
    } else if (a == "--users")
      o.users = integer(1);
    else if (a == "--bookings-per-user")
      o.bookings_per_user = integer(1);
    else if (a == "--rate")
      o.rate = number(0);
    else if (a == "--duration")
      o.duration_s = number(0.001);
    else if (a == "--warmup")
      o.warmup_s = number(0);
    else if (a == "--ramp-ms")
      o.ramp_ms = integer(0);
    else if (a == "--think-ms")
      o.think_ms = integer(0);
    else if (a == "--interval-ms")
      o.interval_ms = integer(1);
    else if (a == "--timeout-ms")
      o.timeout_ms = integer(1);
    else if (a == "--resource")
      o.resource = value();
    else if (a == "--secret")
      o.secret = value();
    else if (a == "--decision-delay-ms")
      o.decision_delay_ms = integer(0);
    else if (a == "--decision-jitter-ms")
      o.decision_jitter_ms = integer(0);
    else if (a == "--capacity")
      o.capacity = static_cast<long>(number(0));
    else if (a == "--server-threads")
      o.server_threads = integer(1);
    else if (a == "--server-workers")
      o.server_workers = integer(1);
    else if (a == "--server")
      o.server_path = value();
    else if (a == "--store")
      o.store = value();
    else if (a == "--server-pid")
      o.server_pids = pid_list(value());
    else if (a == "--client-threads")
      o.client_threads = integer(1);
    else if (a == "--seed")
      o.seed = static_cast<std::uint64_t>(number(0));
    else if (a == "--json")
      o.json = true;
    else if (a == "--no-progress")
      o.progress = false;
    else if (a == "--help" || a == "-h")
      usage(0);
    else {
      fmt::print(stderr, "pushbook-bench: unknown option '{}'\n", a);
      usage(2);
    }
  }
  if (o.tls_cert.empty() != o.tls_key.empty() || (!o.tls_cert.empty() && !o.url.empty())) {
    fmt::print(stderr,
               "pushbook-bench: --tls-cert and --tls-key go together, for a server the bench starts\n");
    std::exit(2);
  }
  if (!o.url.empty() && o.secret.empty()) {
    fmt::print(stderr,
               "pushbook-bench: --url needs --secret (or PUSHBOOK_SECRET): the server's token secret\n");
    std::exit(2);
  }
  return o;
}

// ---------------------------------------------------------------------------------------------
// The server: started here, or found through /proc for CPU accounting.

// The command line of a pushbook-server of our own, with the options this run asks for.
std::vector<std::string> server_command(const Options& o) {
  std::vector<std::string> command{o.server_path.empty() ? self_dir() + "/pushbook-server" : o.server_path,
                                   "--port",
                                   "0",
                                   "--secret",
                                   o.secret,
                                   "--threads",
                                   std::to_string(o.server_threads),
                                   "--workers",
                                   std::to_string(o.server_workers),
                                   "--decision-delay-ms",
                                   std::to_string(o.decision_delay_ms),
                                   "--decision-jitter-ms",
                                   std::to_string(o.decision_jitter_ms),
                                   "--resource",
                                   fmt::format("{}:{}", o.resource, o.capacity),
                                   "--store",
                                   o.store};
  if (!o.tls_cert.empty())
    for (const auto& arg : {std::string("--tls-cert"), o.tls_cert, std::string("--tls-key"), o.tls_key,
                            std::string("--tls-only")})
      command.push_back(arg);
  return command;
}

// The local process listening on a loopback/any-address TCP port: the socket's inode from
// /proc/net/tcp{,6}, then the process holding that inode. 0 when not found (or not ours to see).
long find_listening_pid(std::uint16_t port) {
  std::string inode;
  for (const char* table : {"/proc/net/tcp", "/proc/net/tcp6"}) {
    std::ifstream f(table);
    std::string line;
    std::getline(f, line);
    while (std::getline(f, line)) {
      std::istringstream in(line);
      std::string sl, local, remote, state, queues, timer, retr, uid, timeout, ino;
      in >> sl >> local >> remote >> state >> queues >> timer >> retr >> uid >> timeout >> ino;
      if (state != "0A") continue;  // LISTEN
      const auto colon = local.rfind(':');
      if (colon == std::string::npos || std::stoul(local.substr(colon + 1), nullptr, 16) != port) continue;
      inode = ino;
      break;
    }
    if (!inode.empty()) break;
  }
  if (inode.empty()) return 0;
  const std::string target = "socket:[" + inode + "]";
  DIR* proc = opendir("/proc");
  if (!proc) return 0;
  long found = 0;
  while (dirent* e = readdir(proc)) {
    if (found) break;
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (*end || pid <= 0) continue;
    const std::string fd_dir = fmt::format("/proc/{}/fd", pid);
    DIR* fds = opendir(fd_dir.c_str());
    if (!fds) continue;
    while (dirent* fe = readdir(fds)) {
      char link[256];
      const auto n = readlink((fd_dir + "/" + fe->d_name).c_str(), link, sizeof link - 1);
      if (n > 0 && std::string_view(link, static_cast<std::size_t>(n)) == target) {
        found = pid;
        break;
      }
    }
    closedir(fds);
  }
  closedir(proc);
  return found;
}

// ---------------------------------------------------------------------------------------------
// Shared state of a run.

struct Run {
  Options o;
  tcp::endpoint endpoint;
  std::string host_header;
  std::string host;                   // the name checked against the certificate (and SNI)
  std::shared_ptr<ssl::context> tls;  // set for https:// (wss:// for push)
  steady::time_point start;           // users begin (connect) from here, spread over the ramp
  steady::time_point schedule_at;     // arrival-rate model: first scheduled booking
  steady::time_point measure_from;    // bookings meant to start before this are warm-up
  std::uint64_t planned = 0;

  pushbook::LatencyHistogram latency, ack;
  std::atomic<std::uint64_t> decided{0}, confirmed{0}, rejected{0}, errors{0}, timeouts{0};
  std::atomic<std::uint64_t> requests{0}, ws_messages{0}, bytes{0};
  std::atomic<int> users_left{0};
  // Set by the last user to finish: the end of the run, and the server's CPU then.
  steady::time_point finished;
  std::optional<double> cpu_at_finish;
  std::mutex error_mutex;
  std::string first_error;

  void error(std::string what) {
    ++errors;
    std::lock_guard lock(error_mutex);
    if (first_error.empty()) first_error = std::move(what);
  }
  void decided_one(steady::time_point intended, steady::time_point acked, std::string_view status) {
    ++decided;
    (status == "confirmed" ? confirmed : rejected)++;
    if (intended < measure_from) return;
    const auto now = steady::now();
    latency.record(now - intended);
    ack.record(acked - intended);
  }
  std::chrono::milliseconds timeout() const { return std::chrono::milliseconds(o.timeout_ms); }
  // Counts the bytes a connection carried (the kernel's count) and closes it.
  void retire(tcp::socket& socket) {
    bytes += tcp_bytes(socket.native_handle());
    beast::error_code ignored;
    socket.shutdown(tcp::socket::shutdown_both, ignored);
    socket.close(ignored);
  }
  std::string token(int user) const {
    return pushbook::sign_token(fmt::format("bench-u{}", user),
                                std::chrono::system_clock::now() + std::chrono::hours(12), o.secret);
  }
};

// A new stream of either kind on `ex` (TLS: SNI for a name, and the certificate check unless
// --insecure).
template <class Stream>
void emplace_stream(std::optional<Stream>& stream, const net::any_io_executor& ex, const Run& run) {
  if constexpr (is_tls<Stream>) {
    stream.emplace(ex, *run.tls);
    beast::error_code ec;
    net::ip::make_address(run.host, ec);
    if (ec)  // SSL_set_tlsext_host_name() without its macro's old-style cast
      SSL_ctrl(stream->native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
               const_cast<char*>(run.host.c_str()));
    if (!run.o.insecure) stream->set_verify_callback(ssl::host_name_verification(run.host));
  } else {
    stream.emplace(ex);
  }
}

// TCP connect (no Nagle delay, as browsers), then the TLS handshake for a TLS stream, within
// `op_timeout`.
template <class Stream>
awaitable<void> establish(Stream& stream, const Run& run, std::chrono::milliseconds op_timeout) {
  auto& tcp_layer = beast::get_lowest_layer(stream);
  tcp_layer.expires_after(op_timeout);
  co_await tcp_layer.async_connect(run.endpoint, use_awaitable);
  tcp_layer.socket().set_option(tcp::no_delay(true));
  if constexpr (is_tls<Stream>) co_await stream.async_handshake(ssl::stream_base::client, use_awaitable);
  tcp_layer.expires_never();
}

bool is_decision(std::string_view status) {
  return status == "confirmed" || status == "rejected" || status == "cancelled" || status == "expired" ||
         status == "released";
}

// When each booking of one user is meant to start.
struct Plan {
  const Run* run;
  int user;
  std::vector<steady::time_point> scheduled;  // arrival-rate model
  std::size_t next = 0;
  int made = 0;
  steady::time_point first;

  // The next intended start, or nullopt when the user is done. Closed model: now (after the think
  // time). Arrival-rate model: the scheduled time, even when it has already passed.
  std::optional<steady::time_point> next_start() {
    if (run->o.rate > 0) {
      if (next >= scheduled.size()) return std::nullopt;
      return scheduled[next++];
    }
    if (made >= run->o.bookings_per_user) return std::nullopt;
    const auto t = made++ == 0 ? first : steady::now() + std::chrono::milliseconds(run->o.think_ms);
    return std::max(t, steady::now());
  }
};

awaitable<void> sleep_until(steady::time_point t) {
  if (t <= steady::now()) co_return;
  net::steady_timer timer(co_await net::this_coro::executor, t);
  co_await timer.async_wait(use_awaitable);
}

std::string json_string(const json::value& v, std::string_view key) {
  if (const auto* o = v.if_object())
    if (const auto* s = o->if_contains(key); s && s->is_string()) return std::string(s->get_string());
  return {};
}

// A connection unused for this long is reopened before its next booking, as clients do: the
// gateway closes connections idle for its idle_timeout (60 s by default), and a booking must not
// fail on a connection the server already closed.
constexpr auto reuse_limit = std::chrono::seconds(30);

// ---------------------------------------------------------------------------------------------
// HTTP: one keep-alive connection per user (or a new one per request with --connection close).

template <class Stream>
struct HttpClient {
  Run& run;
  std::string authorization;
  std::optional<Stream> stream;
  beast::flat_buffer buffer;
  steady::time_point last_used;

  HttpClient(Run& r, const std::string& token) : run(r), authorization("Bearer " + token) {}
  ~HttpClient() { close(); }

  // Opens the connection now (keep-alive users connect when they start, like the WebSocket and
  // SSE users, so no mode pays its connection inside a measured booking).
  awaitable<void> connect(std::chrono::milliseconds op_timeout) {
    emplace_stream(stream, co_await net::this_coro::executor, run);
    co_await establish(*stream, run, op_timeout);
    last_used = steady::now();
  }

  awaitable<http::response<http::string_body>> request(http::verb verb, std::string target, std::string body,
                                                       std::chrono::milliseconds op_timeout) {
    if (stream && steady::now() - last_used > reuse_limit) close();
    if (!stream) co_await connect(op_timeout);
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, run.host_header);
    req.set(http::field::authorization, authorization);
    req.set(http::field::user_agent, "pushbook-bench");
    if (!body.empty()) {
      req.set(http::field::content_type, "application/json");
      req.body() = std::move(body);
    }
    req.keep_alive(!run.o.new_connection);
    req.prepare_payload();
    beast::get_lowest_layer(*stream).expires_after(op_timeout);
    co_await http::async_write(*stream, req, use_awaitable);
    http::response<http::string_body> res;
    co_await http::async_read(*stream, buffer, res, use_awaitable);
    ++run.requests;
    last_used = steady::now();
    if (!res.keep_alive()) close();
    co_return res;
  }

  // POST /v1/bookings; the booking id, or empty after counting an error.
  awaitable<std::string> book() {
    auto res = co_await request(http::verb::post, "/v1/bookings",
                                fmt::format(R"({{"resource":"{}"}})", run.o.resource), run.timeout());
    if (res.result() != http::status::accepted) {
      run.error(fmt::format("POST /v1/bookings: HTTP {} {}", res.result_int(), res.body().substr(0, 200)));
      co_return std::string{};
    }
    co_return json_string(json::parse(res.body()), "booking_id");
  }

  void close() {
    if (!stream) return;
    run.retire(beast::get_lowest_layer(*stream).socket());
    stream.reset();
    buffer.clear();
  }
};

// poll and longpoll.
template <class Stream>
awaitable<void> http_user(Run& run, Plan plan) {
  HttpClient<Stream> http(run, run.token(plan.user));
  const bool longpoll = run.o.mode == Mode::longpoll;
  if (!run.o.new_connection) {
    try {
      co_await http.connect(run.timeout());
    } catch (const std::exception& e) {
      run.error(fmt::format("{}: connect: {}", mode_name(run.o.mode), e.what()));
      http.close();  // the first booking connects again
    }
  }
  while (auto intended = plan.next_start()) {
    co_await sleep_until(*intended);
    const auto deadline = *intended + run.timeout();
    try {
      const auto id = co_await http.book();
      const auto acked = steady::now();
      if (id.empty()) continue;
      const std::string target = "/v1/bookings/" + id + (longpoll ? "?wait=25" : "");
      for (;;) {
        if (!longpoll) co_await sleep_until(steady::now() + std::chrono::milliseconds(run.o.interval_ms));
        if (steady::now() > deadline) {
          ++run.timeouts;
          break;
        }
        auto res =
            co_await http.request(http::verb::get, target, {}, run.timeout() + std::chrono::seconds(30));
        if (res.result() == http::status::not_modified) continue;
        if (res.result() != http::status::ok) {
          run.error(
              fmt::format("GET /v1/bookings/<id>: HTTP {} {}", res.result_int(), res.body().substr(0, 200)));
          break;
        }
        const auto status = json_string(json::parse(res.body()), "status");
        if (is_decision(status)) {
          if (steady::now() > deadline)
            ++run.timeouts;  // known, but too late
          else
            run.decided_one(*intended, acked, status);
          break;
        }
      }
    } catch (const std::exception& e) {
      if (steady::now() >= deadline)
        ++run.timeouts;
      else
        run.error(fmt::format("{}: {}", mode_name(run.o.mode), e.what()));
      http.close();
    }
  }
}

// A timer that shuts a socket down when a booking takes longer than the timeout: the pending read
// (and any later one) ends, the user counts the connection's bytes (the descriptor stays valid),
// closes it and reconnects for its next booking. Everything runs on the user's strand.
class Watchdog {
 public:
  template <class Socket>
  Watchdog(net::any_io_executor ex, steady::time_point deadline, Socket& socket)
      : timer_(ex, deadline), alive_(std::make_shared<bool>(true)) {
    timer_.async_wait([alive = alive_, &socket](beast::error_code ec) {
      if (ec || !*alive) return;  // cancelled, or expired just as the watchdog went away
      beast::error_code ignored;
      socket.shutdown(tcp::socket::shutdown_both, ignored);
    });
  }
  ~Watchdog() {
    *alive_ = false;
    timer_.cancel();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  net::steady_timer timer_;
  std::shared_ptr<bool> alive_;
};

// sse: a persistent event stream on user/<id>, bookings by POST.
template <class Stream>
awaitable<void> sse_user(Run& run, Plan plan) {
  const auto ex = co_await net::this_coro::executor;
  const auto token = run.token(plan.user);  // one token for the stream and the bookings
  HttpClient<Stream> http(run, token);
  std::optional<Stream> events;
  std::string pending;  // stream bytes not parsed yet
  auto close_events = [&] {
    if (!events) return;
    run.retire(beast::get_lowest_layer(*events).socket());
    events.reset();
    pending.clear();
  };
  std::array<char, 4096> chunk;
  auto read_more = [&]() -> awaitable<void> {
    const auto n = co_await events->async_read_some(net::buffer(chunk), use_awaitable);
    pending.append(chunk.data(), n);
  };
  for (;;) {
    if (!events) {  // connect before the next booking is due (a failed connect costs that booking)
      try {
        emplace_stream(events, ex, run);
        Watchdog watchdog(ex, steady::now() + run.timeout(), beast::get_lowest_layer(*events).socket());
        co_await establish(*events, run, run.timeout());
        const auto head = fmt::format(
            "GET /v1/events?topic=user/bench-u{} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n"
            "Accept: text/event-stream\r\n\r\n",
            plan.user, run.host_header, token);
        co_await net::async_write(*events, net::buffer(head), use_awaitable);
        ++run.requests;
        while (pending.find("\r\n\r\n") == std::string::npos) co_await read_more();
        if (!pending.starts_with("HTTP/1.1 200"))
          throw std::runtime_error(pending.substr(0, pending.find("\r\n")));
        pending.erase(0, pending.find("\r\n\r\n") + 4);
      } catch (const std::exception& e) {
        run.error(fmt::format("sse: connect: {}", e.what()));
        close_events();
        if (!plan.next_start()) break;
        continue;
      }
    }
    const auto intended = plan.next_start();
    if (!intended) break;
    const auto deadline = *intended + run.timeout();
    try {
      co_await sleep_until(*intended);
      const auto id = co_await http.book();
      const auto acked = steady::now();
      if (id.empty()) continue;
      Watchdog watchdog(ex, deadline, beast::get_lowest_layer(*events).socket());
      bool done = false;
      while (!done) {
        // Messages end with a blank line; the JSON is on the "data: " line.
        for (auto end = pending.find("\n\n"); !done && end != std::string::npos; end = pending.find("\n\n")) {
          const std::string message = pending.substr(0, end);
          pending.erase(0, end + 2);
          const auto data = message.find("data: ");
          if (data == std::string::npos) continue;
          const auto v = json::parse(std::string_view(message).substr(data + 6));
          const auto* d = v.as_object().if_contains("data");
          if (!d || json_string(*d, "booking_id") != id) continue;
          const auto status = json_string(*d, "status");
          if (is_decision(status)) {
            run.decided_one(*intended, acked, status);
            done = true;
          }
        }
        if (!done) co_await read_more();
      }
    } catch (const std::exception& e) {
      if (steady::now() >= deadline)
        ++run.timeouts;
      else
        run.error(fmt::format("sse: {}", e.what()));
      close_events();
      http.close();
    }
  }
  close_events();
}

// push: one WebSocket per user (wss over TLS).
template <class Stream>
awaitable<void> push_user(Run& run, Plan plan) {
  const auto ex = co_await net::this_coro::executor;
  std::optional<Stream> transport;  // made here, then moved into the WebSocket stream
  std::optional<websocket::stream<Stream>> ws;
  beast::flat_buffer buffer;
  const auto token = run.token(plan.user);
  std::int64_t next_id = 0;
  auto close_ws = [&] {
    if (!ws) return;
    run.retire(beast::get_lowest_layer(*ws).socket());
    ws.reset();
    buffer.clear();
  };
  steady::time_point last_used;
  for (;;) {
    if (ws && steady::now() - last_used > reuse_limit) close_ws();
    if (!ws) {  // connect before the next booking is due (a failed connect costs that booking)
      try {
        emplace_stream(transport, ex, run);
        ws.emplace(std::move(*transport));
        transport.reset();
        co_await establish(ws->next_layer(), run, run.timeout());
        ws->set_option(websocket::stream_base::decorator([&token](websocket::request_type& req) {
          req.set(http::field::authorization, "Bearer " + token);
        }));
        ws->set_option(websocket::stream_base::timeout{run.timeout(), websocket::stream_base::none(), false});
        co_await ws->async_handshake(run.host_header, "/v1/ws", use_awaitable);
        ++run.requests;
        ws->text(true);
        last_used = steady::now();
      } catch (const std::exception& e) {
        run.error(fmt::format("push: connect: {}", e.what()));
        close_ws();
        if (!plan.next_start()) break;
        continue;
      }
    }
    const auto intended = plan.next_start();
    if (!intended) break;
    const auto deadline = *intended + run.timeout();
    try {
      co_await sleep_until(*intended);
      const auto book_id = ++next_id;
      co_await ws->async_write(
          net::buffer(fmt::format(R"({{"id":{},"op":"book","resource":"{}","follow":"decision"}})", book_id,
                                  run.o.resource)),
          use_awaitable);
      ++run.ws_messages;
      Watchdog watchdog(ex, deadline, beast::get_lowest_layer(*ws).socket());
      std::string booking_id;
      steady::time_point acked;
      bool done = false;
      while (!done) {
        co_await ws->async_read(buffer, use_awaitable);
        const auto frame = beast::buffers_to_string(buffer.data());
        buffer.consume(buffer.size());
        std::string_view rest = frame;  // one or more messages, one per line
        while (!rest.empty() && !done) {
          const auto nl = rest.find('\n');
          const auto v = json::parse(rest.substr(0, nl));
          rest = nl == std::string_view::npos ? std::string_view{} : rest.substr(nl + 1);
          const auto& o = v.as_object();
          const auto type = json_string(v, "type");
          if (type == "reply" && o.contains("id") && o.at("id").is_int64() &&
              o.at("id").as_int64() == book_id) {
            if (!o.at("ok").as_bool()) {
              run.error("push: book refused: " + json::serialize(o.at("error")));
              done = true;
              break;
            }
            booking_id = json_string(o.at("result"), "booking_id");
            acked = steady::now();
          } else if (type == "event" && !booking_id.empty()) {
            const auto* d = o.if_contains("data");
            if (!d || json_string(*d, "booking_id") != booking_id) continue;
            const auto status = json_string(*d, "status");
            if (!is_decision(status)) continue;
            run.decided_one(*intended, acked, status);
            done = true;
          }
        }
      }
      // "follow":"decision": the gateway ended the booking's subscription after the decision (as a
      // polling client stops polling then), so nothing is left to unsubscribe.
      last_used = steady::now();
    } catch (const std::exception& e) {
      if (steady::now() >= deadline)
        ++run.timeouts;
      else
        run.error(fmt::format("push: {}", e.what()));
      close_ws();
    }
  }
  close_ws();
}

// One user's bookings in the run's mode, over one kind of stream.
template <class Stream>
awaitable<void> user_over(Run& run, Plan plan) {
  switch (run.o.mode) {
    case Mode::poll:
    case Mode::longpoll: co_await http_user<Stream>(run, std::move(plan)); break;
    case Mode::sse: co_await sse_user<Stream>(run, std::move(plan)); break;
    case Mode::push: co_await push_user<Stream>(run, std::move(plan)); break;
  }
}

awaitable<void> user(Run& run, Plan plan) {
  co_await sleep_until(plan.first);  // users start spread over the ramp
  try {
    if (run.tls)  // not a conditional expression: GCC 12 destroys the awaitable of one twice
      co_await user_over<TlsStream>(run, std::move(plan));
    else
      co_await user_over<PlainStream>(run, std::move(plan));
  } catch (const std::exception& e) {
    run.error(fmt::format("user: {}", e.what()));
  }
  if (--run.users_left == 0) {
    run.finished = steady::now();
    if (!run.o.server_pids.empty()) run.cpu_at_finish = process_tree_cpu_seconds(run.o.server_pids);
  }
}

awaitable<void> progress(Run& run) {
  net::steady_timer timer(co_await net::this_coro::executor);
  while (run.users_left.load() > 0) {
    timer.expires_after(std::chrono::milliseconds(250));
    co_await timer.async_wait(use_awaitable);
    const auto done = run.decided.load() + run.errors.load() + run.timeouts.load();
    const double f =
        run.planned ? std::min(1.0, static_cast<double>(done) / static_cast<double>(run.planned)) : 0;
    const int width = 30;
    const int filled = static_cast<int>(f * width);
    fmt::print(stderr, "\r  {:<5} [{}{}] {:3.0f}%  {}/{} bookings  {:.1f} s", mode_name(run.o.mode),
               std::string(static_cast<std::size_t>(filled), '#'),
               std::string(static_cast<std::size_t>(width - filled), '.'), f * 100, done, run.planned,
               std::chrono::duration<double>(steady::now() - run.start).count());
  }
  fmt::print(stderr, "\r{}\r", std::string(80, ' '));
}

json::object summary_json(const pushbook::LatencyHistogram& h) {
  const auto s = h.summary();
  return {{"mean", s.mean_ns / 1e6},
          {"p50", s.p50_ns / 1e6},
          {"p90", s.p90_ns / 1e6},
          {"p99", s.p99_ns / 1e6},
          {"max", s.max_ns / 1e6}};
}

}  // namespace

int main(int argc, char** argv) {
  auto o = parse(argc, argv);
  std::signal(SIGPIPE, SIG_IGN);
  rlimit limit{};
  getrlimit(RLIMIT_NOFILE, &limit);
  limit.rlim_cur = limit.rlim_max;
  setrlimit(RLIMIT_NOFILE, &limit);
  const int fds_per_user = o.mode == Mode::sse ? 2 : 1;
  if (static_cast<rlim_t>(o.users) * fds_per_user + 64 > limit.rlim_cur) {
    fmt::print(stderr, "pushbook-bench: {} users in {} mode need {} file descriptors; the limit is {}\n",
               o.users, mode_name(o.mode), o.users * fds_per_user + 64, limit.rlim_cur);
    return 2;
  }

  std::optional<TempDir> store_dir;  // declared before the server: removed after it stopped
  std::optional<ServerProcess> server;
  Run run;
  try {
    if (o.url.empty()) {
      if (o.secret.empty())
        o.secret = fmt::format("bench-{:08x}{:08x}{:08x}{:08x}", std::random_device{}(),
                               std::random_device{}(), std::random_device{}(), std::random_device{}());
      if (o.store.empty()) {
        store_dir.emplace();
        o.store = "sqlite:" + store_dir->path + "/bench.db";
      }
      server.emplace(server_command(o));
      run.endpoint = tcp::endpoint(net::ip::make_address("127.0.0.1"), server->port);
      run.host_header = fmt::format("127.0.0.1:{}", server->port);
      run.host = "127.0.0.1";
      if (o.server_pids.empty()) o.server_pids = {server->pid};
    } else {
      auto url = boost::urls::parse_uri(o.url);
      if (!url || (url->scheme() != "http" && url->scheme() != "https") || url->host().empty())
        throw std::runtime_error(
            fmt::format("--url must look like http://HOST:PORT or https://HOST:PORT, not '{}'", o.url));
      net::io_context resolve_io;
      tcp::resolver resolver(resolve_io);
      const bool https = url->scheme() == "https";
      const auto port = url->has_port() ? std::string(url->port()) : https ? "443" : "80";
      run.host = url->host_address();
      auto results = resolver.resolve(std::string(url->host_address()), port);  // [::1] without brackets
      run.endpoint = *results.begin();
      run.host_header = fmt::format("{}:{}", std::string(url->host()), port);
      if (o.server_pids.empty() && run.endpoint.address().is_loopback())
        if (const long pid = find_listening_pid(run.endpoint.port())) o.server_pids = {pid};
    }
    if (!o.tls_cert.empty() || o.url.starts_with("https://")) {
      // One client context: full handshakes on every new connection (no session cache), the
      // cost a client without resumption pays.
      run.tls = std::make_shared<ssl::context>(ssl::context::tls_client);
      SSL_CTX_set_min_proto_version(run.tls->native_handle(), TLS1_2_VERSION);
      static const unsigned char alpn[] = {8, 'h', 't', 't', 'p', '/', '1', '.', '1'};
      SSL_CTX_set_alpn_protos(run.tls->native_handle(), alpn, sizeof alpn);
      if (o.insecure) {
        run.tls->set_verify_mode(ssl::verify_none);
      } else {
        run.tls->set_verify_mode(ssl::verify_peer);
        if (o.ca_file.empty())
          run.tls->set_default_verify_paths();
        else
          run.tls->load_verify_file(o.ca_file);
      }
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "pushbook-bench: {}\n", e.what());
    return 1;
  }
  run.o = o;

  net::io_context ioc(o.client_threads);
  std::mt19937_64 random(o.seed);
  run.start = steady::now();
  run.schedule_at = run.start + std::chrono::milliseconds(o.ramp_ms);
  run.measure_from = (o.rate > 0 ? run.schedule_at : run.start) +
                     std::chrono::microseconds(static_cast<long>(o.warmup_s * 1e6));
  std::vector<Plan> plans(static_cast<std::size_t>(o.users));
  std::uniform_int_distribution<long> offset(0, std::max(0, o.ramp_ms) * 1000L);
  for (int u = 0; u < o.users; ++u) {
    auto& p = plans[static_cast<std::size_t>(u)];
    p.run = &run;
    p.user = u;
    p.first = run.start + std::chrono::microseconds(offset(random));
  }
  if (o.rate > 0) {
    const auto total = static_cast<std::uint64_t>(o.rate * o.duration_s);
    const auto step = std::chrono::nanoseconds(static_cast<long>(1e9 / o.rate));
    for (std::uint64_t i = 0; i < total; ++i)
      plans[i % plans.size()].scheduled.push_back(run.schedule_at + step * static_cast<long>(i));
    run.planned = total;
  } else {
    run.planned = static_cast<std::uint64_t>(o.users) * static_cast<std::uint64_t>(o.bookings_per_user);
  }

  const auto cpu_start = o.server_pids.empty() ? std::nullopt : process_tree_cpu_seconds(o.server_pids);
  // Arrival-rate model: server CPU is counted from the first scheduled booking on, so the ramp
  // in which users open their connections (a one-off cost per user, reported apart) is not
  // charged to the bookings. The closed model counts the whole run.
  auto cpu_before = cpu_start;
  std::optional<double> cpu_at_schedule;
  net::steady_timer cpu_timer(ioc, run.schedule_at);
  if (o.rate > 0 && !o.server_pids.empty())
    cpu_timer.async_wait([&](beast::error_code ec) {
      if (!ec) cpu_at_schedule = process_tree_cpu_seconds(o.server_pids);
    });
  run.users_left = o.users;
  for (auto& p : plans) net::co_spawn(net::make_strand(ioc), user(run, std::move(p)), net::detached);
  if (o.progress && isatty(2)) net::co_spawn(ioc, progress(run), net::detached);
  std::vector<std::thread> extra;
  for (int i = 1; i < o.client_threads; ++i) extra.emplace_back([&] { ioc.run(); });
  ioc.run();
  for (auto& t : extra) t.join();
  const double elapsed = std::chrono::duration<double>(run.finished - run.start).count();
  const auto cpu_after = run.cpu_at_finish;
  std::optional<double> connect_cpu;
  if (cpu_at_schedule && cpu_start) {
    connect_cpu = *cpu_at_schedule - *cpu_start;
    cpu_before = cpu_at_schedule;
  }
  if (server) server->stop();

  const auto bookings = run.decided.load();
  const double per = static_cast<double>(std::max<std::uint64_t>(1, bookings));
  const bool cpu_known = cpu_before && cpu_after;  // a local server whose /proc we may read
  const double cpu_per = cpu_known ? (cpu_after.value() - cpu_before.value()) / per : 0.0;
  const auto lat = run.latency.summary();
  const auto ack = run.ack.summary();

  if (o.json) {
    json::array cdf;
    for (double q :
         {0.0,  0.01, 0.02, 0.05, 0.1,  0.15, 0.2,  0.25, 0.3,  0.35, 0.4,  0.45,  0.5,   0.55, 0.6,
          0.65, 0.7,  0.75, 0.8,  0.85, 0.9,  0.92, 0.94, 0.96, 0.98, 0.99, 0.995, 0.999, 1.0})
      cdf.push_back(json::array{q, static_cast<double>(run.latency.percentile(q)) / 1e6});
    json::object out{
        {"mode", mode_name(o.mode)},
        {"connection", o.new_connection ? "close" : "keep-alive"},
        {"tls", run.tls != nullptr},
        {"users", o.users},
        {"model", o.rate > 0 ? "arrival-rate" : "closed"},
        {"rate", o.rate},
        {"interval_ms", o.interval_ms},
        {"bookings", bookings},
        {"measured", lat.count},
        {"confirmed", run.confirmed.load()},
        {"rejected", run.rejected.load()},
        {"errors", run.errors.load()},
        {"timeouts", run.timeouts.load()},
        {"first_error", run.first_error},
        {"duration_s", elapsed},
        {"latency_ms", summary_json(run.latency)},
        {"ack_latency_ms", summary_json(run.ack)},
        {"requests_per_booking", static_cast<double>(run.requests.load()) / per},
        {"ws_messages_per_booking", static_cast<double>(run.ws_messages.load()) / per},
        {"bytes_per_booking", static_cast<double>(run.bytes.load()) / per},
        {"server_cpu_s_per_booking", cpu_known ? json::value(cpu_per) : json::value(nullptr)},
        {"server_cpu_s_ramp", connect_cpu ? json::value(connect_cpu.value()) : json::value(nullptr)},
        {"latency_cdf_ms", std::move(cdf)},
        {"seed", o.seed},
    };
    if (server) {
      out["decision_delay_ms"] = o.decision_delay_ms;
      out["decision_jitter_ms"] = o.decision_jitter_ms;
    }
    fmt::print("{}\n", json::serialize(out));
  } else {
    fmt::print(
        "pushbook-bench: mode {}{}{}, {} users, {} ({} bookings decided, {} measured) in {:.1f} s, seed {}\n",
        mode_name(o.mode), o.mode == Mode::poll ? fmt::format(" every {} ms", o.interval_ms) : "",
        run.tls ? " over TLS" : "", o.users,
        o.rate > 0 ? fmt::format("{} bookings/s for {} s", o.rate, o.duration_s)
                   : fmt::format("{} bookings each", o.bookings_per_user),
        bookings, lat.count, elapsed, o.seed);
    fmt::print("  {:<22}{:>10}{:>10}{:>10}{:>10}{:>10}\n", "ms", "mean", "p50", "p90", "p99", "max");
    for (const auto& [name, s] : {std::pair{"booking -> decision", lat}, std::pair{"booking -> ACK", ack}})
      fmt::print("  {:<22}{:>10.3f}{:>10.3f}{:>10.3f}{:>10.3f}{:>10.3f}\n", name, s.mean_ns / 1e6,
                 s.p50_ns / 1e6, s.p90_ns / 1e6, s.p99_ns / 1e6, s.max_ns / 1e6);
    fmt::print("  confirmed {}  rejected {}  errors {}  timeouts {}\n", run.confirmed.load(),
               run.rejected.load(), run.errors.load(), run.timeouts.load());
    fmt::print(
        "  per booking: {:.2f} HTTP requests, {:.2f} WebSocket messages, {:.0f} bytes, server CPU {}\n",
        static_cast<double>(run.requests.load()) / per, static_cast<double>(run.ws_messages.load()) / per,
        static_cast<double>(run.bytes.load()) / per,
        cpu_known ? fmt::format("{:.1f} us", cpu_per * 1e6) : "unknown (server not local)");
    if (connect_cpu)
      fmt::print("  server CPU while users connected (the {} ms ramp, not in the figure above): {:.3f} s\n",
                 o.ramp_ms, connect_cpu.value());
    if (!run.first_error.empty()) fmt::print("  first error: {}\n", run.first_error);
  }
  return bookings > 0 ? 0 : 1;
}
