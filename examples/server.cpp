// pushbook-server: LocalBus + BookingEngine + PushGateway wired into a runnable server.
//
//   pushbook-server [--port N] [--bind ADDR] [--threads N] [--workers N]
//                   [--store URL] [--recovery requeue|reject] [--bus local|redis://HOST:PORT]
//                   [--node-id N [--store-lease-ms MS]]
//                   [--resource ID:CAPACITY]... [--secret S | --keys FILE | --dev-insecure]
//                   [--decision-delay-ms N [--decision-jitter-ms J]] [--allow-origin ORIGIN]...
//                   [--static-dir DIR] [--demo [--demo-token-ttl-s N]]
//                   [--tls-cert FILE --tls-key FILE [--tls-only] [--tls-client-ca FILE]]
//   pushbook-server --token-for USER [--secret S | --keys FILE] [--ttl-s N]   print a client token
//
// --demo serves the demo page (web/: index.html and the browser client pushbook.js) at "/" and
// hands each visitor a short-lived token (POST /v1/demo/token); it makes up a secret when none is
// given. The secret may also come from PUSHBOOK_SECRET. --keys FILE verifies tokens with the keys
// of a JWKS file instead (HS256 secrets, an identity provider's RS256/ES256 public keys, by kid);
// SIGHUP reloads it. SIGINT and SIGTERM stop it gracefully.
//
// --store: where bookings are kept. The default is the SQLite file pushbook.db in the current
// directory (a booking ACKed is stored; a restart recovers everything); "sqlite:PATH?sync=full"
// survives a power loss too; "memory:" keeps nothing across a restart (benchmarks, throwaway use);
// "postgresql://user@host/db" keeps them in PostgreSQL, which several servers can share: the
// database then enforces capacity, so together they never give out more than a resource has.
//
// --bus: where events travel. "local" (the default) is the in-process LocalBus; a Redis address
// (redis://host:port[/db], unix:/path) makes it a RedisBus, so that several servers on one Redis
// share every topic's numbering and events.
//
// --node-id N: this server's number in a cluster (several servers on one PostgreSQL and one
// Redis, behind a load balancer: examples/cluster, docs/deployment.md).
//
// --tls-cert/--tls-key: https, wss and SSE over TLS on the port (plain HTTP too unless
// --tls-only); SIGHUP reloads the certificate and key (a renewal without a restart).
#include <pushbook/auth.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/booking_store.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/postgres_store.hpp>
#include <pushbook/push_gateway.hpp>
#include <pushbook/redis_bus.hpp>

#include <fmt/format.h>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <random>
#include <string_view>
#include <thread>

namespace {

struct Options {
  pushbook::GatewayOptions gateway;
  // The engine's limits (workers, recovery and store are set apart). A public server gets per-user
  // quotas by default.
  pushbook::EngineOptions engine = [] {
    pushbook::EngineOptions e;
    e.max_in_flight_per_user = 100;
    e.max_held_units_per_user = 100;
    return e;
  }();
  std::size_t workers = 2;
  bool decide_on_caller = true;  // --decide-on-caller
  std::string store = "sqlite:pushbook.db";
  std::string bus = "local";
  std::optional<std::uint32_t> node_id;  // --node-id
  long store_lease_ms = 0;               // --store-lease-ms (0: PostgresOptions' default)
  pushbook::RecoveryPolicy recovery = pushbook::RecoveryPolicy::requeue;
  std::vector<std::pair<std::string, std::uint32_t>> resources;
  int decision_delay_ms = 0;
  int decision_jitter_ms = 0;
  std::string token_for;
  std::string keys_file;
  long ttl_s = 3600;
  bool demo = false;
  long demo_ttl_s = 600;
};

// Whether --store names a PostgreSQL database (opened with this server's node id and lease).
bool is_postgres_url(std::string_view url) {
  return url.starts_with("postgresql://") || url.starts_with("postgres://");
}

// The demo page's files: installed beside the binary (<prefix>/share/pushbook/web for
// <prefix>/bin/pushbook-server), else the source tree this binary was built from.
std::string demo_web_dir() {
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto installed = exe.parent_path().parent_path() / "share" / "pushbook" / "web";
    if (std::filesystem::exists(installed / "index.html", ec)) return installed.string();
  }
  return PUSHBOOK_WEB_DIR;
}

constexpr const char* synopsis =
    "usage: pushbook-server [--port N] [--bind ADDR] [--threads N] [--workers N]\n"
    "                       [--store URL] [--recovery requeue|reject] [--bus local|redis://H:P]\n"
    "                       [--node-id N [--store-lease-ms MS]]\n"
    "                       [--resource ID:CAPACITY]...\n"
    "                       [--secret S | --secret-file F | --keys FILE | --dev-insecure]\n"
    "                       [--decision-delay-ms N [--decision-jitter-ms J]] [--allow-origin ORIGIN]...\n"
    "                       [--static-dir DIR] [--demo [--demo-token-ttl-s N]] [--access-log]\n"
    "                       [--tls-cert FILE --tls-key FILE [--tls-only] [--tls-client-ca FILE]]\n"
    "                       [limits: --max-connections N, --user-rate-limit N, ... (see --help)]\n"
    "       pushbook-server --token-for USER [--secret S | --keys FILE] [--ttl-s N]\n";

// --help: every option with its default; a usage error: the synopsis and where to look.
[[noreturn]] void usage(int code) {
  if (code != 0) {
    fmt::print(stderr, "{}run 'pushbook-server --help' for every option\n", synopsis);
    std::exit(code);
  }
  fmt::print(
      "pushbook-server: a booking engine and its push gateway (WebSocket, SSE, REST) in one process.\n"
      "Clients book, and get the decision pushed instead of polling for it (docs/protocol.md).\n\n"
      "{}"
      "\nServer:\n"
      "  --port N            TCP port to listen on (default 8080; 0: any free port, printed at start)\n"
      "  --bind ADDR         address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)\n"
      "  --threads N         gateway I/O threads (default: one per core)\n"
      "  --workers N         engine threads that decide bookings (default 2)\n"
      "  --decide-on-caller on|off   without --decision-delay-ms, decide a booking on the\n"
      "                      thread that took it (default on; off: on a worker; the in-memory\n"
      "                      store only: a durable store's commits complete on its own thread)\n"
      "\nBookings:\n"
      "  --store URL         where bookings are kept (default sqlite:pushbook.db, in the current\n"
      "                      directory): sqlite:PATH survives a crash, sqlite:PATH?sync=full a power\n"
      "                      loss too; memory: keeps nothing across a restart;\n"
      "                      postgresql://USER@HOST[:PORT]/DB: PostgreSQL, shared by several servers\n"
      "  --bus B             where events travel: local (in this process, the default) or a Redis\n"
      "                      address, redis://HOST:PORT[/DB] or unix:/PATH, shared by every server\n"
      "                      on it (RedisBus: clients resume on any of them)\n"
      "  --node-id N         this server's number in a cluster (0 to 4294967295), unique among the\n"
      "                      servers sharing a store and bus: it is part of every booking id, names\n"
      "                      this server's claims in PostgreSQL (\"node-N\"; a restart under the same\n"
      "                      number takes its own claims back at once), and is sent as the\n"
      "                      Pushbook-Node header and in /healthz (docs/deployment.md)\n"
      "  --store-lease-ms MS how long a postgresql:// store's claim on an undecided booking lasts\n"
      "                      without renewal: a server that dies has its bookings taken over by the\n"
      "                      others within it (default 10000, at least 100)\n"
      "  --recovery P        bookings found undecided at start: requeue (decide them again, the\n"
      "                      default) or reject (reason \"recovery\")\n"
      "  --resource ID:N     a resource and its capacity, repeatable (default room-101:10,\n"
      "                      room-102:10, concert:100); over an existing store it is reconciled,\n"
      "                      never below the units in use\n"
      "  --decision-delay-ms N   a simulated business step (a payment call): every booking is\n"
      "                      approved N ms after it was taken (default 0, at most 3600000)\n"
      "  --decision-jitter-ms J  plus a uniform random 0..J ms (default 0)\n"
      "\nClients:\n"
      "  --secret S          the HS256 secret client tokens are signed with, at least 32 bytes\n"
      "                      (required unless --dev-insecure or --demo). A command line is visible\n"
      "                      to every user of the machine (/proc/PID/cmdline): prefer the\n"
      "                      PUSHBOOK_SECRET environment variable (the default) or --secret-file\n"
      "  --secret-file FILE  read the secret from FILE (a trailing newline is dropped)\n"
      "  --keys FILE         verify tokens with the keys of FILE instead of one secret: a JWKS\n"
      "                      ({{\"keys\":[...]}}) of HS256 secrets (kty oct, at least 32 bytes),\n"
      "                      RSA (RS256) and EC P-256 (ES256) public keys, chosen by each token's\n"
      "                      kid (docs/protocol.md, \"Keys\"). SIGHUP reloads it: rotation without\n"
      "                      a restart (a bad file is reported and the keys in use stay).\n"
      "                      PUSHBOOK_SECRET is ignored with --keys\n"
      "  --dev-insecure      no tokens: clients name themselves with ?user= (development only)\n"
      "  --allow-origin O    a browser Origin allowed to connect, repeatable (default: any)\n"
      "  --static-dir DIR    serve the files of DIR at / (default: none; --demo serves web/)\n"
      "  --demo              serve the demo page at / and hand out demo tokens\n"
      "                      (POST /v1/demo/token); makes a secret up when none is given\n"
      "  --demo-token-ttl-s N    lifetime of a demo token (default 600)\n"
      "  --access-log        log a line per HTTP request and per WebSocket/SSE session (user, peer,\n"
      "                      route, status, bytes, duration; never a token) on stderr\n"
      "\nTLS (https, wss, SSE over TLS; TLS 1.2 and 1.3, ALPN http/1.1):\n"
      "  --tls-cert FILE     PEM: the server certificate, then its chain's intermediates\n"
      "  --tls-key FILE      PEM: its private key (RSA or EC, not encrypted)\n"
      "  --tls-only          TLS only (default: plain and TLS share the port, told apart by the\n"
      "                      first bytes); plain HTTP then gets a 400 saying so\n"
      "  --tls-client-ca FILE    PEM CAs: clients must present a certificate one of them signed\n"
      "                      SIGHUP reloads the certificate and key (a bad pair is reported and\n"
      "                      the one in use stays)\n"
      "\nLimits (what one client or user may cost the server):\n"
      "  --max-connections N     open connections, at most (default 100000); beyond, 503. At the\n"
      "                      open file limit (ulimit -n) accepts wait: a warning every 10 s and\n"
      "                      pushbook_accept_failures_total in /metrics say so\n"
      "  --user-rate-limit N     HTTP requests per second per user, across connections (default\n"
      "                      20; 0: none), beyond: 429 with Retry-After\n"
      "  --user-rate-burst N     the burst allowed above it (default 100)\n"
      "  --rate-limit N      WebSocket messages per second per connection (default 100); a\n"
      "                      sustained flood is closed with 1008\n"
      "  --rate-burst N      the burst allowed above it (default 200)\n"
      "  --max-message-bytes N   largest WebSocket message (default 65536; beyond: close 1009)\n"
      "  --max-body-bytes N  largest HTTP request body (default 65536; beyond: 413)\n"
      "  --max-subscriptions N   subscriptions per connection (default 256)\n"
      "  --max-queued-bytes N    unsent bytes per connection (default 1048576); beyond, the\n"
      "                      slow-consumer policy applies\n"
      "  --slow-consumer P   disconnect (close 1013, the client resumes; the default) or drop\n"
      "                      (drop the oldest events and send a gap marker)\n"
      "  --handshake-timeout-ms N   time to send a request head or finish the WebSocket\n"
      "                      handshake (default 10000)\n"
      "  --idle-timeout-s N  an idle connection is closed after it (default 60)\n"
      "  --max-long-poll-s N longest ?wait= of a long-poll (default 60)\n"
      "  --shutdown-timeout-s N  how long SIGTERM lets bookings in flight finish, then\n"
      "                      connections close (default 5)\n"
      "  --max-queue N       bookings waiting for a worker, at most (default 65536); beyond, 503\n"
      "  --max-hold-s N      longest hold a booking may ask for (default 900)\n"
      "  --max-metadata-bytes N  largest booking metadata, as JSON (default 4096)\n"
      "  --max-in-flight-per-user N   a user's bookings being decided, at most (default 100;\n"
      "                      0: none); beyond, 429 quota_exceeded\n"
      "  --max-held-units-per-user N  units a user may hold at once (default 100; 0: none)\n"
      "\nTokens:\n"
      "  --token-for USER    print a client token for USER signed with --secret (or with the\n"
      "                      signing HS256 key of --keys, its kid in the header), and exit\n"
      "  --ttl-s N           its lifetime in seconds (default 3600)\n"
      "\nSIGINT and SIGTERM stop it gracefully (WebSockets get close code 1001); SIGHUP reloads --keys\n"
      "and the TLS certificate and key.\n"
      "\nExample:\n"
      "  export PUSHBOOK_SECRET=$(head -c 32 /dev/urandom | base64)\n"
      "  pushbook-server --port 8080 --resource room-101:5 --decision-delay-ms 20\n"
      "  TOKEN=$(pushbook-server --token-for alice)\n"
      "  curl -X POST localhost:8080/v1/bookings -H \"Authorization: Bearer $TOKEN\" -d "
      "'{{\"resource\":\"room-101\"}}'\n",
      synopsis);
  std::exit(0);
}

// A flag's value out of a fixed set ("--recovery is requeue or reject, not 'maybe'").
template <class T>
T one_of(std::string_view flag, const std::string& v,
         std::initializer_list<std::pair<std::string_view, T>> choices) {
  for (const auto& [name, choice] : choices)
    if (v == name) return choice;
  std::string names;
  for (const auto& choice : choices) names += (names.empty() ? "" : " or ") + std::string(choice.first);
  fmt::print(stderr, "{} is {}, not '{}'\n", flag, names, v);
  usage(2);
}

Options parse(int argc, char** argv) {
  Options o;
  o.gateway.port = 8080;
  if (const char* s = std::getenv("PUSHBOOK_SECRET")) o.gateway.secret = s;
  bool explicit_secret = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        fmt::print(stderr, "{} needs a value\n", a);
        usage(2);
      }
      return argv[++i];
    };
    auto number = [&]() -> long {
      const auto v = value();
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end || n < 0) {
        fmt::print(stderr, "{} needs a non-negative number, not '{}'\n", a, v);
        usage(2);
      }
      return n;
    };
    auto milliseconds = [&]() -> int {  // a business step of at most an hour
      const long ms = number();
      if (ms > 3'600'000) {
        fmt::print(stderr, "{} is at most 3600000 (an hour), not {}\n", a, ms);
        usage(2);
      }
      return static_cast<int>(ms);
    };
    auto positive = [&]() -> std::size_t {
      const long n = number();
      if (n == 0) {
        fmt::print(stderr, "{} must be at least 1\n", a);
        usage(2);
      }
      return static_cast<std::size_t>(n);
    };
    auto duration_of = [&](long at_most) -> long {
      const long n = number();
      if (n == 0 || n > at_most) {
        fmt::print(stderr, "{} must be from 1 to {}, not {}\n", a, at_most, n);
        usage(2);
      }
      return n;
    };
    auto& g = o.gateway;
    if (a == "--port")
      o.gateway.port = static_cast<std::uint16_t>(number());
    else if (a == "--access-log")
      g.access_log = true;
    else if (a == "--max-connections")
      g.max_connections = positive();
    else if (a == "--user-rate-limit") {
      const auto v = value();
      char* end = nullptr;
      const double rate = std::strtod(v.c_str(), &end);
      if (v.empty() || *end || !(rate >= 0) || rate > 1e9) {
        fmt::print(stderr, "--user-rate-limit needs a number of requests per second (0: none), not '{}'\n",
                   v);
        usage(2);
      }
      g.user_rate_limit_per_second = rate;
    } else if (a == "--user-rate-burst")
      g.user_rate_limit_burst = positive();
    else if (a == "--rate-limit")
      g.rate_limit_per_second = static_cast<double>(positive());
    else if (a == "--rate-burst")
      g.rate_limit_burst = positive();
    else if (a == "--max-message-bytes")
      g.max_message_bytes = positive();
    else if (a == "--max-body-bytes")
      g.max_body_bytes = positive();
    else if (a == "--max-subscriptions")
      g.max_subscriptions = positive();
    else if (a == "--max-queued-bytes")
      g.max_queued_bytes = positive();
    else if (a == "--slow-consumer")
      g.slow_consumer =
          one_of<pushbook::SlowConsumerPolicy>(a, value(),
                                               {{"disconnect", pushbook::SlowConsumerPolicy::disconnect},
                                                {"drop", pushbook::SlowConsumerPolicy::drop_with_gap}});
    else if (a == "--handshake-timeout-ms")
      g.handshake_timeout = std::chrono::milliseconds(duration_of(3'600'000));
    else if (a == "--idle-timeout-s")
      g.idle_timeout = std::chrono::seconds(duration_of(86'400));
    else if (a == "--max-long-poll-s")
      g.max_long_poll = std::chrono::seconds(duration_of(3'600));
    else if (a == "--shutdown-timeout-s")
      g.shutdown_timeout = std::chrono::seconds(duration_of(3'600));
    else if (a == "--max-queue")
      o.engine.max_queue = positive();
    else if (a == "--max-hold-s")
      o.engine.max_hold = std::chrono::seconds(duration_of(365L * 86'400));
    else if (a == "--max-metadata-bytes")
      o.engine.max_metadata_bytes = positive();
    else if (a == "--max-in-flight-per-user")
      o.engine.max_in_flight_per_user = static_cast<std::size_t>(number());
    else if (a == "--max-held-units-per-user")
      o.engine.max_held_units_per_user = static_cast<std::uint64_t>(number());
    else if (a == "--bind")
      o.gateway.host = value();
    else if (a == "--threads")
      o.gateway.threads = static_cast<std::size_t>(number());
    else if (a == "--store")
      o.store = value();
    else if (a == "--bus") {
      o.bus = value();
      if (o.bus != "local" && !o.bus.starts_with("redis://") && !o.bus.starts_with("unix:")) {
        fmt::print(stderr,
                   "--bus is local or a Redis address (redis://HOST:PORT[/DB], unix:/PATH), not '{}'\n",
                   o.bus);
        usage(2);
      }
    } else if (a == "--node-id") {
      const long n = number();
      if (n > 4294967295L) {
        fmt::print(stderr, "--node-id is from 0 to 4294967295, not {}\n", n);
        usage(2);
      }
      o.node_id = static_cast<std::uint32_t>(n);
    } else if (a == "--store-lease-ms") {
      o.store_lease_ms = number();
      if (o.store_lease_ms < 100 || o.store_lease_ms > 3'600'000) {
        fmt::print(stderr, "--store-lease-ms is from 100 to 3600000, not {}\n", o.store_lease_ms);
        usage(2);
      }
    } else if (a == "--recovery")
      o.recovery = one_of<pushbook::RecoveryPolicy>(
          a, value(),
          {{"requeue", pushbook::RecoveryPolicy::requeue}, {"reject", pushbook::RecoveryPolicy::reject}});
    else if (a == "--workers")
      o.workers = static_cast<std::size_t>(number());
    else if (a == "--decide-on-caller")
      o.decide_on_caller = one_of<bool>(a, value(), {{"on", true}, {"off", false}});
    else if (a == "--secret") {
      o.gateway.secret = value();
      explicit_secret = true;
    } else if (a == "--secret-file") {
      explicit_secret = true;
      const auto path = value();
      std::ifstream file(path);
      if (!file) {
        fmt::print(stderr, "--secret-file: cannot read '{}'\n", path);
        usage(2);
      }
      std::string secret((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
      while (!secret.empty() && (secret.back() == '\n' || secret.back() == '\r')) secret.pop_back();
      o.gateway.secret = std::move(secret);
    } else if (a == "--keys")
      o.keys_file = value();
    else if (a == "--dev-insecure")
      o.gateway.dev_insecure = true;
    else if (a == "--decision-delay-ms")
      o.decision_delay_ms = milliseconds();
    else if (a == "--decision-jitter-ms")
      o.decision_jitter_ms = milliseconds();
    else if (a == "--allow-origin")
      o.gateway.allowed_origins.push_back(value());
    else if (a == "--static-dir")
      o.gateway.static_dir = value();
    else if (a == "--tls-cert")
      o.gateway.tls.cert_file = value();
    else if (a == "--tls-key")
      o.gateway.tls.key_file = value();
    else if (a == "--tls-only")
      o.gateway.tls.tls_only = true;
    else if (a == "--tls-client-ca")
      o.gateway.tls.client_ca_file = value();
    else if (a == "--demo")
      o.demo = true;
    else if (a == "--demo-token-ttl-s")
      o.demo_ttl_s = number();
    else if (a == "--token-for")
      o.token_for = value();
    else if (a == "--ttl-s")
      o.ttl_s = number();
    else if (a == "--resource") {
      const auto spec = value();
      const auto colon = spec.rfind(':');
      char* end = nullptr;
      const long cap = colon == std::string::npos ? -1 : std::strtol(spec.c_str() + colon + 1, &end, 10);
      if (colon == std::string::npos || cap < 0 || *end) {
        fmt::print(stderr, "--resource needs ID:CAPACITY, not '{}'\n", spec);
        usage(2);
      }
      o.resources.emplace_back(spec.substr(0, colon), static_cast<std::uint32_t>(cap));
    } else if (a == "--help" || a == "-h")
      usage(0);
    else {
      fmt::print(stderr, "unknown option '{}'\n", a);
      usage(2);
    }
  }
  if (!o.keys_file.empty()) {
    if (explicit_secret) {
      fmt::print(stderr, "give --secret (or --secret-file) or --keys, not both\n");
      usage(2);
    }
    o.gateway.secret.clear();  // PUSHBOOK_SECRET: the keys file says which keys are good
  }
  // A short HS256 secret is guessable offline from any one token: at least 32 bytes, as for a
  // key (RFC 7518 asks for at least the hash's size). Development mode needs none.
  if (!o.gateway.secret.empty() && o.gateway.secret.size() < 32 && !o.gateway.dev_insecure) {
    fmt::print(stderr,
               "the secret must be at least 32 bytes, not {} (make one: head -c 32 /dev/urandom | base64)\n",
               o.gateway.secret.size());
    usage(2);
  }
  if (o.store_lease_ms && !is_postgres_url(o.store)) {
    fmt::print(stderr, "--store-lease-ms is for a postgresql:// store (--store), not '{}'\n", o.store);
    usage(2);
  }
  const auto& tls = o.gateway.tls;
  if ((tls.tls_only || !tls.client_ca_file.empty() || !tls.key_file.empty()) && tls.cert_file.empty()) {
    fmt::print(stderr, "--tls-key, --tls-only and --tls-client-ca need --tls-cert\n");
    usage(2);
  }
  if (!tls.cert_file.empty() && tls.key_file.empty()) {
    fmt::print(stderr, "--tls-cert needs --tls-key\n");
    usage(2);
  }
  if (o.node_id) o.gateway.node_name = fmt::format("node-{}", *o.node_id);
  if (o.resources.empty()) o.resources = {{"room-101", 10}, {"room-102", 10}, {"concert", 100}};
  if (o.demo) {
    if (o.demo_ttl_s <= 0) {
      fmt::print(stderr, "--demo-token-ttl-s must be positive\n");
      usage(2);
    }
    o.gateway.demo_token_ttl = std::chrono::seconds(o.demo_ttl_s);
    if (o.gateway.static_dir.empty()) o.gateway.static_dir = demo_web_dir();
    if (o.gateway.secret.empty() && o.keys_file.empty() &&
        o.token_for.empty()) {  // --token-for needs the server's real secret
      std::random_device rd;
      for (int i = 0; i < 4; ++i) o.gateway.secret += fmt::format("{:08x}", rd());
    }
  }
  return o;
}

// The keys of a --keys file, refused when an HS256 secret in it is shorter than --secret may be.
pushbook::result<std::shared_ptr<const pushbook::KeySet>> load_keys(const std::string& path) {
  auto keys = pushbook::KeySet::load_file(path);
  if (!keys) return keys.error();
  for (const auto& key : keys->keys())
    if (key.algorithm == pushbook::TokenAlgorithm::hs256 && key.bits < 256)
      return pushbook::Error(pushbook::errc::bad_request,
                             fmt::format("{}: the HS256 key \"{}\" has {} bytes; at least 32 are needed",
                                         path, key.kid, key.bits / 8));
  return std::make_shared<const pushbook::KeySet>(std::move(*keys));
}

// SIGHUP: the --keys file and the TLS certificate and key again. What does not load leaves what
// is in use as it was.
void reload(pushbook::PushGateway& gateway, const std::string& path) {
  if (gateway.tls_enabled()) {
    if (auto r = gateway.reload_tls(); !r)
      fmt::print(stderr, "pushbook-server: SIGHUP: {}; the certificate in use stays\n", r.error().message);
    else
      fmt::print("pushbook-server: SIGHUP: TLS certificate and key reloaded\n");
  }
  if (path.empty()) {
    if (!gateway.tls_enabled()) fmt::print("pushbook-server: SIGHUP received; no --keys file to reload\n");
  } else if (auto keys = load_keys(path); !keys) {
    fmt::print(stderr, "pushbook-server: SIGHUP: {}; the keys in use stay\n", keys.error().message);
  } else {
    const auto count = (*keys)->size();
    if (auto set = gateway.set_keys(std::move(*keys)); !set)
      fmt::print(stderr, "pushbook-server: SIGHUP: {}: {}; the keys in use stay\n", path,
                 set.error().message);
    else
      fmt::print("pushbook-server: SIGHUP: {} keys loaded from {}\n", count, path);
  }
  std::fflush(stdout);
  std::fflush(stderr);
}

}  // namespace

// The store URL as it may be printed: a postgresql:// URI's password replaced by "***".
std::string without_password(const std::string& url) {
  const auto scheme = url.find("://");
  const auto at = url.find('@');
  if (scheme == std::string::npos || at == std::string::npos || !url.starts_with("postgres")) return url;
  const auto colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at) return url;
  return url.substr(0, colon + 1) + "***" + url.substr(at);
}

int main(int argc, char** argv) {
  auto opt = parse(argc, argv);
  if (!opt.keys_file.empty()) {
    auto keys = load_keys(opt.keys_file);
    if (!keys) {
      fmt::print(stderr, "pushbook-server: --keys {}\n", keys.error().message);
      return 2;
    }
    opt.gateway.keys = std::move(*keys);
  }
  if (!opt.token_for.empty()) {
    const auto expires = std::chrono::system_clock::now() + std::chrono::seconds(opt.ttl_s);
    if (opt.gateway.keys) {
      auto token = pushbook::sign_token(opt.token_for, expires, *opt.gateway.keys);
      if (!token) {
        fmt::print(stderr, "--token-for: --keys {}: {}\n", opt.keys_file, token.error().message);
        return 2;
      }
      fmt::print("{}\n", *token);
      return 0;
    }
    if (opt.gateway.secret.empty()) {
      fmt::print(stderr, "--token-for needs --secret or PUSHBOOK_SECRET (or --keys)\n");
      return 2;
    }
    fmt::print("{}\n", pushbook::sign_token(opt.token_for, expires, opt.gateway.secret));
    return 0;
  }

  // Block the signals main waits for with sigwait below in every thread, set before any thread
  // starts (the store's writer too): the stop signals, and SIGHUP, which reloads --keys.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // PostgreSQL with this node's name and lease; anything else from its URL alone.
  auto store = [&]() -> pushbook::result<std::shared_ptr<pushbook::BookingStore>> {
    if (!is_postgres_url(opt.store)) return pushbook::open_store(opt.store);
    pushbook::PostgresOptions po;
    if (opt.node_id) po.node_id = opt.gateway.node_name;
    if (opt.store_lease_ms) po.lease = std::chrono::milliseconds(opt.store_lease_ms);
    auto pg = pushbook::PostgresStore::open(opt.store, po);
    if (!pg) return pg.error();
    return std::shared_ptr<pushbook::BookingStore>(std::move(*pg));
  }();
  if (!store) {
    fmt::print(stderr, "pushbook-server: --store {}: {}\n", without_password(opt.store),
               store.error().message);
    return store.error().is(pushbook::errc::bad_request) ? 2 : 1;
  }

  // The simulated business step (a payment call) answers after --decision-delay-ms plus a uniform
  // random 0..--decision-jitter-ms, on a timer.
  boost::asio::io_context timers;
  auto guard = boost::asio::make_work_guard(timers);
  std::thread timer_thread([&] { timers.run(); });

  try {
    std::shared_ptr<pushbook::EventBus> bus;
    if (opt.bus == "local") {
      bus = std::make_shared<pushbook::LocalBus>();
    } else {
      pushbook::RedisBusOptions ro;
      ro.address = opt.bus;
      ro.log = [](const std::string& line) { fmt::print(stderr, "pushbook-server: {}\n", line); };
      auto redis = std::make_shared<pushbook::RedisBus>(ro);  // throws for an address it cannot parse
      // Start anyway when Redis is not up yet (it reconnects), but say so.
      if (!redis->wait_connected(ro.connect_timeout))
        fmt::print(stderr,
                   "pushbook-server: --bus {}: Redis does not answer yet; retrying in the background\n",
                   opt.bus);
      bus = redis;
    }
    pushbook::EngineOptions eo = opt.engine;
    eo.workers = opt.workers;
    eo.decide_on_caller = opt.decide_on_caller;
    eo.recovery = opt.recovery;
    eo.node_id = opt.node_id;
    eo.store = std::move(*store);
    if (opt.decision_delay_ms > 0 || opt.decision_jitter_ms > 0)
      eo.handler = [&timers, delay = opt.decision_delay_ms, jitter = opt.decision_jitter_ms](
                       const pushbook::Booking&, pushbook::Completion done) {
        thread_local std::minstd_rand random{std::random_device{}()};
        const int ms =
            delay + (jitter > 0 ? static_cast<int>(random() % static_cast<unsigned>(jitter + 1)) : 0);
        auto timer = std::make_shared<boost::asio::steady_timer>(timers, std::chrono::milliseconds(ms));
        timer->async_wait([timer, done](boost::system::error_code) { done(pushbook::Decision::approved()); });
      };
    auto engine = std::make_shared<pushbook::BookingEngine>(bus, eo);  // recovers from the store
    for (const auto& [id, capacity] : opt.resources)
      if (auto added = engine->add_resource(id, capacity); !added)
        throw std::runtime_error(fmt::format("--resource {}:{}: {}", id, capacity, added.error().message));
    const auto recovered = engine->stats().recovered;

    // Before the "listening" line, which scripts wait for.
    fmt::print("pushbook-server: store {}{}\n", without_password(opt.store),
               recovered ? fmt::format(" ({} undecided bookings recovered)", recovered) : "");

    pushbook::PushGateway gateway(bus, engine, opt.gateway);
    auto port = gateway.listen();
    // Through the handler below, which stops the timer thread: returning from here would destroy
    // it joinable (std::terminate, an abort instead of a clear exit status).
    if (!port) throw std::runtime_error(port.error().message);
    const auto& tls = opt.gateway.tls;
    fmt::print("pushbook-server listening on {}://{}:{} ({}{} resources, decision delay {}{} ms{})\n",
               tls.cert_file.empty() ? "http" : "https", opt.gateway.host, *port,
               tls.cert_file.empty() ? ""
               : tls.tls_only        ? "TLS only, "
                                     : "plain HTTP too, ",
               opt.resources.size(), opt.decision_delay_ms,
               opt.decision_jitter_ms ? fmt::format("+0..{}", opt.decision_jitter_ms) : "",
               opt.node_id ? ", " + opt.gateway.node_name : "");
    if (opt.demo)
      fmt::print("pushbook-server: demo page at {}://{}:{}/ (serving {})\n",
                 tls.cert_file.empty() ? "http" : "https", opt.gateway.host, *port, opt.gateway.static_dir);
    std::fflush(stdout);

    int sig = 0;
    while (sigwait(&signals, &sig) == 0 && sig == SIGHUP) reload(gateway, opt.keys_file);
    fmt::print("pushbook-server: {} received, stopping\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    std::fflush(stdout);
    gateway.stop();
    engine->shutdown();
  } catch (const std::exception& e) {
    fmt::print(stderr, "pushbook-server: {}\n", e.what());
    guard.reset();
    timers.stop();
    timer_thread.join();
    return 1;
  }
  guard.reset();
  timer_thread.join();
  fmt::print("pushbook-server: stopped\n");
  return 0;
}
