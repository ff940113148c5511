#include <pushbook/beast.hpp>
#include <pushbook/beast_ssl.hpp>
#include <pushbook/push_gateway.hpp>

#include "gateway/core.hpp"
#include "gateway/http_session.hpp"
#include "gateway/listener.hpp"
#include "gateway/tls.hpp"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <boost/asio/post.hpp>

#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>

namespace pushbook {
namespace detail {

// --- SessionRegistry -------------------------------------------------------------------------

void SessionRegistry::add(const std::shared_ptr<Session>& s) {
  bool closing = false;
  {
    std::lock_guard lock(mutex_);
    sessions_[s.get()] = s;
    closing = closing_;
  }
  if (closing) s->shutdown();  // posts to the session's strand: runs after what run() started
}

void SessionRegistry::remove(const Session* s) {
  std::lock_guard lock(mutex_);
  sessions_.erase(s);
  if (sessions_.empty()) empty_.notify_all();
}

std::vector<std::shared_ptr<Session>> SessionRegistry::snapshot() {
  std::lock_guard lock(mutex_);
  std::vector<std::shared_ptr<Session>> out;
  out.reserve(sessions_.size());
  for (auto& [p, weak] : sessions_)
    if (auto s = weak.lock()) out.push_back(std::move(s));
  return out;
}

std::vector<std::shared_ptr<Session>> SessionRegistry::close_all() {
  {
    std::lock_guard lock(mutex_);
    closing_ = true;
  }
  return snapshot();
}

bool SessionRegistry::wait_empty(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock lock(mutex_);
  return empty_.wait_until(lock, deadline, [&] { return sessions_.empty(); });
}

std::size_t SessionRegistry::size() {
  std::lock_guard lock(mutex_);
  return sessions_.size();
}

// --- GatewayCore -----------------------------------------------------------------------------

net::io_context& GatewayCore::next_context() {
  if (host_context) return *host_context;
  return *own_contexts[next.fetch_add(1, std::memory_order_relaxed) % own_contexts.size()];
}

net::any_io_executor GatewayCore::connection_executor() {
  if (host_context) return net::make_strand(*host_context);
  return next_context().get_executor();
}

bool GatewayCore::take_demo_user(std::chrono::steady_clock::time_point now) {
  std::lock_guard lock(demo_mutex);
  return demo_bucket.take(now, demo_users_per_second, demo_users_burst);
}

void GatewayCore::accept_failed(std::string_view why) {
  metrics.accept_failures.fetch_add(1, std::memory_order_relaxed);
  accept_failing.store(true, std::memory_order_relaxed);
  constexpr auto period = std::chrono::seconds(10);
  const auto now = std::chrono::steady_clock::now();
  std::uint64_t count = 0;
  {
    std::lock_guard lock(accept_log_mutex);
    ++accept_failures_unlogged;
    if (accept_logged != std::chrono::steady_clock::time_point{} && now - accept_logged < period) return;
    accept_logged = now;
    count = std::exchange(accept_failures_unlogged, 0);
  }
  log(LogLevel::warning,
      fmt::format(
          "accept failed ({} failure(s) since the last report): {}; retrying every 100 ms, reported at "
          "most every {} s ({} connections open, file limit {}: raise it with ulimit -n, or lower "
          "max_connections)",
          count, why, period.count(), open_connections.load(), metrics.fd_limit.load()));
}

void GatewayCore::accept_succeeded() {
  if (!accept_failing.load(std::memory_order_relaxed)) return;
  std::uint64_t count = 0;
  {
    std::lock_guard lock(accept_log_mutex);
    if (!accept_failing.exchange(false, std::memory_order_relaxed)) return;
    count = std::exchange(accept_failures_unlogged, 0);
    accept_logged = {};  // the next failure is reported at once
  }
  log(LogLevel::warning,
      fmt::format("accepting connections again ({} more failed accept(s) since the last report)", count));
}

std::string GatewayCore::metrics_text() const {
  auto stats = ctx->engine->stats();
  auto text = metrics.render(&stats, ctx->bus.get());
  if (ctx->hub) GatewayMetrics::render_topic_hub(text, ctx->hub->stats());
  return text;
}

void GatewayCore::access(std::string_view fields) const {
  if (!ctx->options.access_log) return;
  log(LogLevel::info, fmt::format("access {}", fields));
}

void GatewayCore::log(LogLevel level, std::string_view message) const {
  if (ctx->options.log) return ctx->options.log(level, message);
  if (level == LogLevel::debug) return;
  static const char* names[] = {"debug", "info", "warning", "error"};
  std::fprintf(stderr, "%s pushbook-gateway %s: %.*s\n",
               fmt::format("{:%FT%TZ}", fmt::gmtime(std::time(nullptr))).c_str(),
               names[static_cast<int>(level)], static_cast<int>(message.size()), message.data());
}

void set_no_delay(tcp::socket& socket) {
  // A push server writes small messages and must not let Nagle's algorithm hold one back until the
  // previous one is acknowledged (with delayed ACKs that is a 40 ms stall per exchange).
  boost::system::error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);
}

std::string endpoint_text(const tcp::endpoint& peer) {
  return fmt::format("{}:{}", peer.address().to_string(), peer.port());
}

void GatewayCore::serve(tcp::socket socket) {
  metrics.connections_total.fetch_add(1, std::memory_order_relaxed);
  const auto open = open_connections.fetch_add(1) + 1;
  // While the gateway drains, new connections are still served: /healthz answers 503 (so a
  // balancer stops sending), bookings and upgrades are refused with 503.
  const bool refuse = static_cast<std::size_t>(open) > ctx->options.max_connections;
  set_no_delay(socket);
  if (tls) return serve_tls_port(shared_from_this(), std::move(socket), refuse);
  std::make_shared<HttpSession<PlainStream>>(shared_from_this(), PlainStream(std::move(socket)), refuse)
      ->run();
}

namespace {
// A query key as the URL parser reads it (percent-decoded): "access%5Ftoken" is access_token too.
std::string decoded_key(std::string_view key) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  for (std::size_t i = 0; i < key.size(); ++i) {
    if (key[i] == '%' && i + 2 < key.size() && hex(key[i + 1]) >= 0 && hex(key[i + 2]) >= 0) {
      out += static_cast<char>(hex(key[i + 1]) * 16 + hex(key[i + 2]));
      i += 2;
    } else {
      out += key[i];
    }
  }
  return out;
}
}  // namespace

std::string redact_target(std::string_view target) {
  const auto q = target.find('?');
  if (q == std::string_view::npos) return std::string(target);
  std::string out(target.substr(0, q + 1));
  std::string_view query = target.substr(q + 1);
  for (bool first = true;; first = false) {
    const auto amp = query.find('&');
    const auto item = query.substr(0, amp);
    const auto eq = item.find('=');
    if (!first) out += '&';
    if (eq != std::string_view::npos && decoded_key(item.substr(0, eq)) == "access_token")
      out.append(item.substr(0, eq)).append("=REDACTED");
    else
      out += item;
    if (amp == std::string_view::npos) break;
    query = query.substr(amp + 1);
  }
  return out;
}

}  // namespace detail

struct PushGateway::impl {
  std::shared_ptr<detail::GatewayCore> core;
  std::mutex stop_mutex;
  bool stopped = false;

  void start(EventBusPtr bus, std::shared_ptr<BookingEngine> engine, GatewayOptions options,
             boost::asio::io_context* host) {
    if (!bus) throw Exception(Error(errc::bad_request, "PushGateway needs an event bus"));
    if (!engine) throw Exception(Error(errc::bad_request, "PushGateway needs a booking engine"));
    auto parsed_keys = detail::keys_from_options(options);
    if (!parsed_keys) throw Exception(parsed_keys.error());
    auto keys = std::move(*parsed_keys);
    if (!keys && !options.dev_insecure)
      throw Exception(Error(errc::bad_request,
                            "PushGateway needs a token secret (GatewayOptions::secret) or keys "
                            "(GatewayOptions::keys), or dev_insecure for development"));
    if (options.demo_token_ttl.count() < 0 ||
        (options.demo_token_ttl.count() > 0 && !(keys && keys->signing_kid())))
      throw Exception(Error(errc::bad_request,
                            "demo tokens need a token secret (GatewayOptions::secret) or an HS256 key that "
                            "signs in GatewayOptions::keys"));
    if (options.max_message_bytes == 0 || options.max_queued_bytes == 0 ||
        !(options.rate_limit_per_second > 0))
      throw Exception(Error(errc::bad_request, "limits must be positive"));
    if (!(options.user_rate_limit_per_second >= 0) || std::isinf(options.user_rate_limit_per_second))
      throw Exception(Error(errc::bad_request, "user_rate_limit_per_second must be 0 (none) or positive"));
    // A header value: nothing that could split or forge a header.
    if (options.node_name.size() > 64 ||
        options.node_name.find_first_not_of(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:") != std::string::npos)
      throw Exception(Error(errc::bad_request, "node_name is at most 64 letters, digits and -_.: , not '" +
                                                   options.node_name.substr(0, 80) + "'"));
    core = std::make_shared<detail::GatewayCore>();
    const auto& tls = options.tls;
    if (!tls.cert_file.empty() || !tls.key_file.empty() || !tls.client_ca_file.empty()) {
      auto context = detail::TlsContext::create(tls);
      if (!context) throw Exception(context.error());
      core->tls = std::move(*context);
    }
    core->user_limiter = std::make_unique<detail::UserRateLimiter>(
        options.user_rate_limit_per_second, static_cast<double>(options.user_rate_limit_burst));
    auto ctx = std::make_shared<detail::GatewayContext>();
    ctx->bus = std::move(bus);
    // The hub subscribes with subscribe_async: no gateway thread waits for the bus (RedisBus:
    // two round trips to Redis per topic the node starts following).
    ctx->hub = std::make_shared<detail::TopicHub>(ctx->bus, 64, 65536);
    ctx->engine = std::move(engine);
    ctx->options = std::move(options);
    ctx->metrics = &core->metrics;
    ctx->keys->set(std::move(keys));
    core->ctx = std::move(ctx);
    if (core->ctx->options.demo_token_ttl.count() > 0)
      core->log(LogLevel::warning,
                "demo mode: POST /v1/demo/token hands a token to anyone who asks. Demo use only.");
    if (rlimit fds{}; getrlimit(RLIMIT_NOFILE, &fds) == 0) {
      const auto limit = fds.rlim_cur == RLIM_INFINITY ? std::numeric_limits<std::int64_t>::max()
                                                       : static_cast<std::int64_t>(fds.rlim_cur);
      core->metrics.fd_limit.store(limit);
      if (static_cast<std::uint64_t>(limit) < core->ctx->options.max_connections)
        core->log(LogLevel::info,
                  fmt::format("the open file limit ({}) is below max_connections ({}): at the limit new "
                              "connections wait (pushbook_accept_failures_total); raise it with ulimit -n",
                              limit, core->ctx->options.max_connections));
    }
    if (core->ctx->options.dev_insecure)
      core->log(LogLevel::warning,
                "*** DEVELOPMENT MODE: clients are NOT authenticated (--dev-insecure). Never expose this "
                "server. ***");
    if (host) {
      core->host_context = host;
      return;
    }
    std::size_t n = core->ctx->options.threads;
    if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
    for (std::size_t i = 0; i < n; ++i) {
      core->own_contexts.push_back(std::make_unique<boost::asio::io_context>(1));
      core->guards.push_back(boost::asio::make_work_guard(*core->own_contexts.back()));
    }
    for (std::size_t i = 0; i < n; ++i)
      core->threads.emplace_back([ioc = core->own_contexts[i].get()] { ioc->run(); });
  }
};

PushGateway::PushGateway(EventBusPtr bus, std::shared_ptr<BookingEngine> engine, GatewayOptions options)
    : impl_(std::make_shared<impl>()) {
  impl_->start(std::move(bus), std::move(engine), std::move(options), nullptr);
}

PushGateway::PushGateway(EventBusPtr bus, std::shared_ptr<BookingEngine> engine, GatewayOptions options,
                         boost::asio::io_context& io_context)
    : impl_(std::make_shared<impl>()) {
  impl_->start(std::move(bus), std::move(engine), std::move(options), &io_context);
}

PushGateway::~PushGateway() { stop(); }

result<std::uint16_t> PushGateway::listen() {
  auto& core = impl_->core;
  if (core->stopping.load()) return Error(errc::shutting_down, "the gateway is stopped");
  if (core->listener) return Error(errc::bad_request, "listen() was called already");
  auto listener = std::make_shared<detail::Listener>(core, core->next_context());
  auto port = listener->open(core->ctx->options.host, core->ctx->options.port);
  if (!port) return port.error();
  core->listener = listener;
  core->port = *port;
  listener->run();
  core->log(LogLevel::info, fmt::format("listening on {}:{}{}", core->ctx->options.host, *port,
                                        !core->tls                        ? ""
                                        : core->ctx->options.tls.tls_only ? " (TLS only)"
                                                                          : " (TLS and plain)"));
  return *port;
}

std::uint16_t PushGateway::port() const noexcept { return impl_->core->port.load(); }

void PushGateway::accept_socket(int native_handle) {
  auto& core = impl_->core;
  if (core->stopping.load()) {
    ::close(native_handle);
    return;
  }
  detail::tcp::socket socket(core->connection_executor());
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  ::getsockname(native_handle, reinterpret_cast<sockaddr*>(&addr), &len);
  boost::system::error_code ec;
  socket.assign(addr.ss_family == AF_INET6 ? detail::tcp::v6() : detail::tcp::v4(), native_handle, ec);
  if (ec) {
    core->log(LogLevel::warning, fmt::format("accept_socket: {}", ec.message()));
    ::close(native_handle);
    return;
  }
  core->serve(std::move(socket));
}

void PushGateway::stop() {
  std::lock_guard once(impl_->stop_mutex);
  if (impl_->stopped) return;
  impl_->stopped = true;
  auto& core = impl_->core;
  // 1. Drain: no new bookings (and /healthz says 503), while the bookings in flight are decided
  //    and their decisions pushed, within shutdown_timeout.
  core->ctx->draining->store(true);  // first: whoever sees "stopping" sees draining too
  core->stopping.store(true);
  const auto timeout = core->ctx->options.shutdown_timeout;
  const auto drain_until = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < drain_until &&
         (core->ctx->engine->stats().in_flight > 0 || !core->ctx->pending_submits->wait_zero(drain_until)))
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // stop() is a host thread's call
  // 2. Then close: the listener, and every connection (WebSockets with 1001 once what is queued
  //    for them is written), within another shutdown_timeout.
  if (core->listener) core->listener->stop();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (auto& s : core->registry.close_all()) s->shutdown();
  if (!core->registry.wait_empty(deadline)) {
    core->log(LogLevel::warning,
              fmt::format("{} connections still open after the shutdown timeout; cutting them",
                          core->registry.size()));
    for (auto& s : core->registry.snapshot()) s->abort();
    core->registry.wait_empty(std::chrono::steady_clock::now() + std::chrono::seconds(2));
  }
  // Answers of bookings still being stored are posted to the io_contexts: let them arrive before
  // the contexts go (a store gives up after its busy_timeout, so this is bounded in practice).
  if (!core->ctx->pending_submits->wait_zero(std::chrono::steady_clock::now() + std::chrono::seconds(30)))
    core->log(LogLevel::warning, "bookings still being stored after 30 s; stopping anyway");
  for (auto& g : core->guards) g.reset();
  for (auto& ioc : core->own_contexts) ioc->stop();
  for (auto& t : core->threads)
    if (t.joinable()) t.join();
  // Destroying our io_contexts destroys the handlers that never ran (a cancelled accept, say)
  // and with them the last references they hold; the listener refers back to the core.
  core->listener.reset();
  core->guards.clear();
  core->own_contexts.clear();
  if (core->port.load() != 0) core->log(LogLevel::info, "stopped");
}

result<void> PushGateway::set_keys(std::shared_ptr<const KeySet> keys) {
  if (!keys || keys->empty()) return Error(errc::bad_request, "set_keys: an empty key set");
  const auto& ctx = *impl_->core->ctx;
  if (ctx.options.demo_token_ttl.count() > 0 && !keys->signing_kid())
    return Error(errc::bad_request, "set_keys: demo tokens need an HS256 key that signs");
  const auto count = keys->size();
  ctx.keys->set(std::move(keys));
  impl_->core->log(LogLevel::info, fmt::format("token keys replaced: {} keys", count));
  return {};
}

std::shared_ptr<const KeySet> PushGateway::keys() const { return impl_->core->ctx->keys->get(); }

result<void> PushGateway::reload_tls() {
  auto& core = impl_->core;
  if (!core->tls) return Error(errc::bad_request, "reload_tls: the gateway has no TLS (GatewayOptions::tls)");
  if (auto r = core->tls->reload(); !r) {
    core->metrics.tls_reload_failures.fetch_add(1);
    core->log(LogLevel::error,
              fmt::format("TLS reload failed, the certificate in use stays: {}", r.error().message));
    return r.error();
  }
  core->metrics.tls_reloads.fetch_add(1);
  core->log(LogLevel::info,
            fmt::format("TLS certificate reloaded from '{}'", core->ctx->options.tls.cert_file));
  return {};
}

bool PushGateway::tls_enabled() const noexcept { return impl_->core->tls != nullptr; }

GatewayStats PushGateway::stats() const {
  const auto& m = impl_->core->metrics;
  GatewayStats s;
  s.websocket_connections = m.websocket_connections.load();
  s.sse_connections = m.sse_connections.load();
  s.http_connections = m.http_connections.load();
  s.connections_total = m.connections_total.load();
  s.subscriptions = m.subscriptions.load();
  s.messages_pushed = m.messages_pushed.load();
  s.frames_written = m.frames_written.load();
  s.bytes_pushed = m.bytes_pushed.load();
  s.slow_consumer_disconnects = m.slow_consumer_disconnects.load();
  s.dropped_messages = m.dropped_messages.load();
  s.accept_failures = m.accept_failures.load();
  s.user_rate_limited = m.user_rate_limited.load();
  return s;
}

std::string PushGateway::metrics_text() const { return impl_->core->metrics_text(); }

class GatewayAccess {
 public:
  static std::shared_ptr<detail::GatewayCore>& core(PushGateway& g) { return g.impl_->core; }
};

void serve_request(PushGateway& gateway, boost::beast::tcp_stream stream,
                   boost::beast::http::request<boost::beast::http::string_body> request) {
  auto& core = GatewayAccess::core(gateway);
  if (core->stopping.load()) return;  // the stream closes the connection as it goes
  // Move the connection onto the gateway's own threads, whatever executor the host used.
  auto socket = stream.release_socket();
  boost::system::error_code ec;
  const auto protocol = socket.local_endpoint(ec).protocol();
  const auto fd = ec ? -1 : socket.release(ec);
  if (ec || fd < 0) {
    core->log(LogLevel::warning, fmt::format("serve_request: cannot take the connection: {}", ec.message()));
    return;
  }
  detail::tcp::socket own(core->connection_executor());
  own.assign(protocol, fd, ec);
  if (ec) {
    ::close(fd);
    return;
  }
  core->metrics.connections_total.fetch_add(1, std::memory_order_relaxed);
  core->open_connections.fetch_add(1);
  detail::set_no_delay(own);
  std::make_shared<detail::HttpSession<detail::PlainStream>>(core, detail::PlainStream(std::move(own)), false)
      ->run_with(std::move(request));
}

void serve_request(PushGateway& gateway, boost::beast::ssl_stream<boost::beast::tcp_stream> stream,
                   boost::beast::http::request<boost::beast::http::string_body> request) {
  auto& core = GatewayAccess::core(gateway);
  if (core->stopping.load()) return;  // the stream closes the connection as it goes
  // The TLS state cannot change executors: the session stays on the stream's (a strand).
  core->metrics.connections_total.fetch_add(1, std::memory_order_relaxed);
  core->open_connections.fetch_add(1);
  detail::set_no_delay(detail::socket_of(stream));
  std::make_shared<detail::HttpSession<detail::TlsStream>>(core, std::move(stream), false)
      ->run_with(std::move(request));
}

}  // namespace pushbook
