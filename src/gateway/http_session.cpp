#include "gateway/http_session.hpp"

#include "gateway/raw_websocket_session.hpp"
#include "gateway/sse_session.hpp"
#include "gateway/websocket_session.hpp"

#include <pushbook/auth.hpp>

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/url/parse.hpp>

#include <charconv>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace pushbook::detail {

namespace websocket = beast::websocket;

namespace {

constexpr std::string_view server_name = "pushbook";

bool origin_allowed(const GatewayContext& ctx, const Request& req) {
  if (ctx.options.allowed_origins.empty()) return true;
  auto it = req.find(http::field::origin);
  if (it == req.end()) return true;  // not a browser: the allow-list guards against cross-site use
  const std::string_view origin = it->value();
  for (const auto& allowed : ctx.options.allowed_origins)
    if (origin == allowed) return true;
  return false;
}

std::string etag_of(const Booking& b) { return fmt::format("\"{}.{}\"", b.id, b.version); }

std::string booking_body(const Booking& b) {
  auto o = to_json(b);
  o["seq"] = static_cast<std::int64_t>(b.version);  // booking/<id> carries one event per version
  return boost::json::serialize(o);
}

std::string_view content_type_for(std::string_view path) {
  auto ends = [&](std::string_view ext) { return path.ends_with(ext); };
  if (ends(".html")) return "text/html; charset=utf-8";
  if (ends(".js") || ends(".mjs")) return "text/javascript; charset=utf-8";
  if (ends(".css")) return "text/css; charset=utf-8";
  if (ends(".json")) return "application/json";
  if (ends(".svg")) return "image/svg+xml";
  if (ends(".png")) return "image/png";
  if (ends(".ico")) return "image/x-icon";
  return "application/octet-stream";
}

}  // namespace

template <class Stream>
HttpSession<Stream>::HttpSession(std::shared_ptr<GatewayCore> core, Stream stream, bool refuse,
                                 std::string_view already_read)
    : core_(std::move(core)),
      stream_(std::move(stream)),
      executor_(stream_.get_executor()),
      buffer_(read_buffer_limit),
      refuse_(refuse) {
  if (!already_read.empty()) {
    const auto n = std::min(already_read.size(), buffer_.max_size());
    buffer_.commit(net::buffer_copy(buffer_.prepare(n), net::buffer(already_read.data(), n)));
  }
  core_->metrics.http_connections.fetch_add(1);
  counted_ = true;
}

template <class Stream>
HttpSession<Stream>::~HttpSession() {
  if (counted_) core_->metrics.http_connections.fetch_sub(1);
  if (!handed_over_) core_->open_connections.fetch_sub(1);
  core_->registry.remove(this);
}

template <class Stream>
void HttpSession<Stream>::run() {
  // Reading starts before the session registers: a shutdown() that registering posts (stop()
  // running) then finds the read started and closes the idle connection.
  net::dispatch(executor_, [self = this->shared_from_this()] { self->do_read(); });
  core_->registry.add(this->shared_from_this());
}

template <class Stream>
void HttpSession<Stream>::run_with(Request request) {
  started_ = std::chrono::steady_clock::now();
  net::dispatch(executor_, [self = this->shared_from_this(), req = std::move(request)]() mutable {
    self->handle(std::move(req));
  });
  core_->registry.add(this->shared_from_this());  // after: a shutdown() it posts finds the request
}

template <class Stream>
void HttpSession<Stream>::shutdown() {
  net::post(executor_, [self = this->shared_from_this()] {
    if (self->handed_over_) return;  // the WebSocket or SSE session has the connection
    self->shutdown_requested_ = true;
    if (self->poll_) {
      self->poll_->keep_alive = false;
      self->finish_long_poll(true);
    } else if (self->parser_ && !self->parser_->got_some()) {
      self->do_close();  // idle between requests: nothing to finish
    }
  });
}

template <class Stream>
void HttpSession<Stream>::abort() {
  net::post(executor_, [self = this->shared_from_this()] {
    if (self->handed_over_) return;
    boost::system::error_code ec;
    socket_of(self->stream_).close(ec);
  });
}

template <class Stream>
void HttpSession<Stream>::do_read() {
  if (refuse_) {
    started_ = std::chrono::steady_clock::now();
    Request dummy;
    dummy.version(11);
    core_->metrics.connections_refused.fetch_add(1);
    auto res = error_response(dummy, http::status::service_unavailable, "overloaded",
                              "too many connections; retry later");
    res.keep_alive(false);
    return send(std::move(res), "refused");
  }
  user_.clear();
  method_.clear();
  retry_after_ = 0;
  parser_.emplace();
  parser_->body_limit(core_->ctx->options.max_body_bytes);
  parser_->header_limit(header_limit);
  if (first_request_ || buffer_.size() > 0) return read_request();
  // Keep-alive: the next request may start any time within the idle timeout; once its first
  // bytes are here it gets the handshake timeout to be complete, as the first one (slow-loris).
  beast::get_lowest_layer(stream_).expires_after(core_->ctx->options.idle_timeout);
  stream_.async_read_some(buffer_.prepare(std::min<std::size_t>(4096, buffer_.max_size() - buffer_.size())),
                          [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                            if (ec) return self->on_read(ec, 0);
                            self->buffer_.commit(n);
                            self->read_request();
                          });
}

// The request (head and body) within the handshake timeout.
template <class Stream>
void HttpSession<Stream>::read_request() {
  started_ = std::chrono::steady_clock::now();  // the request's first bytes are here (or expected now)
  beast::get_lowest_layer(stream_).expires_after(core_->ctx->options.handshake_timeout);
  http::async_read(stream_, buffer_, *parser_,
                   [self = this->shared_from_this()](boost::system::error_code ec, std::size_t n) {
                     self->on_read(ec, n);
                   });
}

template <class Stream>
void HttpSession<Stream>::on_read(boost::system::error_code ec, std::size_t) {
  if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
      ec == net::error::operation_aborted || ec == net::error::connection_reset || ec == net::error::eof)
    return do_close();
  Request blank;
  blank.version(11);
  if (ec == http::error::body_limit) {
    auto res =
        error_response(blank, http::status::payload_too_large, "too_large",
                       fmt::format("request body larger than {} bytes", core_->ctx->options.max_body_bytes));
    res.keep_alive(false);
    return send(std::move(res), "error");
  }
  if (ec == http::error::buffer_overflow && parser_->is_header_done()) {
    // A chunk-size line, chunk extension or trailer that never ends.
    auto res = error_response(blank, http::status::payload_too_large, "too_large",
                              fmt::format("chunk header or trailer longer than {} bytes", read_buffer_limit));
    res.keep_alive(false);
    return send(std::move(res), "error");
  }
  if (ec == http::error::header_limit || ec == http::error::buffer_overflow) {
    auto res = error_response(blank, http::status::request_header_fields_too_large, "too_large",
                              "request header too large");
    res.keep_alive(false);
    return send(std::move(res), "error");
  }
  if (ec) {
    auto res = error_response(blank, http::status::bad_request, "bad_request",
                              fmt::format("malformed HTTP request: {}", ec.message()));
    res.keep_alive(false);
    return send(std::move(res), "error");
  }
  first_request_ = false;
  beast::get_lowest_layer(stream_).expires_never();
  handle(parser_->release());
}

template <class Stream>
result<Identity> HttpSession<Stream>::auth(const Request& req, const boost::urls::url_view& url,
                                           bool allow_subprotocol) {
  auto who = authenticate(*core_->ctx, req, url, allow_subprotocol);
  if (!who) return who;
  user_ = who->user;
  long retry_after = 1;
  if (!core_->user_limiter->take(who->user, std::chrono::steady_clock::now(), &retry_after)) {
    core_->metrics.user_rate_limited.fetch_add(1, std::memory_order_relaxed);
    retry_after_ = retry_after;
    return Error(errc::rate_limited,
                 fmt::format("more than {} requests per second from this user; retry in {} s",
                             core_->ctx->options.user_rate_limit_per_second, retry_after));
  }
  return who;
}

template <class Stream>
Response HttpSession<Stream>::json_response(const Request& req, http::status status, std::string body) const {
  Response res{status, req.version()};
  res.set(http::field::server, server_name);
  res.set(http::field::content_type, "application/json");
  res.set(http::field::cache_control, "no-store");
  res.keep_alive(req.keep_alive() && !shutdown_requested_ && !core_->stopping.load());
  res.body() = std::move(body);
  res.prepare_payload();
  return res;
}

template <class Stream>
Response HttpSession<Stream>::error_response(const Request& req, http::status status, std::string_view code,
                                             std::string_view message) const {
  return json_response(req, status, http_error_body(code, message));
}

template <class Stream>
Response HttpSession<Stream>::error_response(const Request& req, const Error& e) const {
  const auto w = wire_error(e.code);
  auto res = error_response(req, static_cast<http::status>(w.http_status), w.code, e.message);
  if (w.http_status == 401) res.set(http::field::www_authenticate, "Bearer");
  if (e.is(errc::rate_limited) && retry_after_ > 0)
    res.set(http::field::retry_after, std::to_string(retry_after_));
  if (e.is(errc::quota_exceeded) || e.is(errc::store_failed)) res.set(http::field::retry_after, "1");
  return res;
}

template <class Stream>
void HttpSession<Stream>::handle(Request&& req) {
  const auto& ctx = *core_->ctx;
  method_ = std::string(req.method_string());
  core_->log(LogLevel::debug,
             fmt::format("{} {}", std::string_view(req.method_string()), redact_target(req.target())));
  auto url = boost::urls::parse_origin_form(req.target());
  if (!url)
    return send(error_response(req, http::status::bad_request, "bad_request", "malformed request target"),
                "error");
  const std::string path(url->path());

  if (websocket::is_upgrade(req)) {
    if (path != "/v1/ws")
      return send(error_response(req, http::status::not_found, "not_found", "WebSocket endpoint is /v1/ws"),
                  "other");
    if (!origin_allowed(ctx, req))
      return send(error_response(req, http::status::forbidden, "forbidden", "origin not allowed"), "/v1/ws");
    auto who = auth(req, *url, true);
    if (!who) return send(error_response(req, who.error()), "/v1/ws");
    if (core_->stopping.load())
      return send(error_response(req, http::status::service_unavailable, "overloaded", "shutting down"),
                  "/v1/ws");
    if constexpr (!is_tls_stream<Stream>) {
      // Plain TCP without permessage-deflate: the gateway's own RFC 6455 layer (a fraction of
      // Beast's stream's memory and CPU per connection); TLS and compression stay with Beast.
      if (!ctx.options.permessage_deflate) {
        if (auto refused = check_upgrade(req)) {
          auto res = error_response(req, static_cast<http::status>(refused->status), "bad_request",
                                    refused->message);
          if (refused->status == 426) res.set(http::field::sec_websocket_version, "13");
          return send(std::move(res), "/v1/ws");
        }
        core_->metrics.count_request("/v1/ws", 101);
        handed_over_ = true;
        const auto pending = buffer_.data();
        const std::string already_read(static_cast<const char*>(pending.data()), pending.size());
        start_raw_websocket(core_, stream_.release_socket(), req, std::move(who->user), who->expires,
                            already_read);
        core_->registry.remove(this);
        return;
      }
    }
    core_->metrics.count_request("/v1/ws", 101);
    handed_over_ = true;
    auto ws = std::make_shared<WebSocketSession<Stream>>(core_, std::move(stream_));
    ws->run(std::move(req), std::move(who->user), who->expires);
    core_->registry.remove(this);  // after the new session registered: stop() sees one of them
    return;
  }

  if (path == "/healthz") {
    if (req.method() != http::verb::get)
      return send(error_response(req, http::status::method_not_allowed, "bad_request", "use GET"),
                  "/healthz");
    // 503 while draining, or while the store cannot take changes (a database that went away) or
    // the bus is unreachable (Redis): a balancer sends new clients and bookings elsewhere meanwhile.
    const bool stopping = core_->stopping.load();
    const bool store_up = core_->ctx->engine->store_available();
    const bool bus_up = core_->ctx->bus->available();
    const std::string status = stopping ? "stopping" : store_up && bus_up ? "ok" : "degraded";
    const auto& node = core_->ctx->options.node_name;
    const std::string body = R"({"status":")" + status + R"(","store":")" + (store_up ? "up" : "down") +
                             R"(","bus":")" + (bus_up ? "up" : "down") + '"' +
                             (node.empty() ? "" : R"(,"node":")" + node + '"') + "}";
    return send(
        json_response(req, status == "ok" ? http::status::ok : http::status::service_unavailable, body),
        "/healthz");
  }
  if (path == "/metrics") {
    auto res = json_response(req, http::status::ok, core_->metrics_text());
    res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
    res.prepare_payload();
    return send(std::move(res), "/metrics");
  }
  if (path == "/v1/whoami") {
    // Whether a token is good, and for whom: a client whose WebSocket upgrade failed cannot see
    // the 401 (browsers hide it) and asks here before it retries with the same token.
    if (req.method() != http::verb::get)
      return send(error_response(req, http::status::method_not_allowed, "bad_request", "use GET"),
                  "/v1/whoami");
    auto who = auth(req, *url, false);
    if (!who) return send(error_response(req, who.error()), "/v1/whoami");
    boost::json::object out{{"user", who->user}};
    if (who->expires)
      out["expires_at"] =
          std::chrono::duration_cast<std::chrono::milliseconds>(who->expires->time_since_epoch()).count();
    return send(json_response(req, http::status::ok, boost::json::serialize(out)), "/v1/whoami");
  }
  if (path == "/v1/events") {
    if (req.method() != http::verb::get)
      return send(error_response(req, http::status::method_not_allowed, "bad_request", "use GET"),
                  "/v1/events");
    if (!origin_allowed(ctx, req))
      return send(error_response(req, http::status::forbidden, "forbidden", "origin not allowed"),
                  "/v1/events");
    auto who = auth(req, *url, false);
    if (!who) return send(error_response(req, who.error()), "/v1/events");
    auto topic = query_param(*url, "topic");
    if (!topic || !is_valid_topic(*topic))
      return send(error_response(req, http::status::bad_request, "bad_request", "give one valid ?topic="),
                  "/v1/events");
    if (!ctx.may_subscribe(who->user, *topic))
      return send(error_response(req, http::status::forbidden, "forbidden",
                                 fmt::format("you may not subscribe to '{}'", *topic)),
                  "/v1/events");
    auto resume = resume_point(req, *url);
    if (!resume) return send(error_response(req, resume.error()), "/v1/events");
    // Draining: a new stream would be cut in a moment; a balancer sends it to another node.
    if (core_->stopping.load())
      return send(error_response(req, http::status::service_unavailable, "overloaded", "shutting down"),
                  "/v1/events");
    core_->metrics.count_request("/v1/events", 200);
    handed_over_ = true;
    auto sse = std::make_shared<SseSession<Stream>>(core_, std::move(stream_));
    sse->run(req.version(), *topic, resume->since, resume->epoch, who->user);
    core_->registry.remove(this);  // after the new session registered: stop() sees one of them
    return;
  }
  if (path == "/v1/bookings" || path.starts_with("/v1/bookings/"))
    return route_bookings(std::move(req), *url, std::string_view(path).substr(12));
  if (path == "/v1/resources" || path.starts_with("/v1/resources/"))
    return route_resources(req, std::string_view(path).substr(13));
  if (path == "/v1/demo/token" && ctx.options.demo_token_ttl.count() > 0) return route_demo_token(req, *url);
  if (!ctx.options.static_dir.empty() && !path.starts_with("/v1/")) return route_static(req, path);
  send(error_response(req, http::status::not_found, "not_found",
                      fmt::format("no route for {}", path.substr(0, 200))),
       "other");
}

template <class Stream>
void HttpSession<Stream>::route_bookings(Request&& req, const boost::urls::url_view& url,
                                         std::string_view rest) {
  const auto& ctx = *core_->ctx;
  auto who = auth(req, url, false);
  if (rest.empty() || rest == "/") {
    if (req.method() != http::verb::post) {
      auto res = error_response(req, http::status::method_not_allowed, "bad_request", "use POST to book");
      res.set(http::field::allow, "POST");
      return send(std::move(res), "/v1/bookings");
    }
    // A browser page of another site must not book with the user's credentials (CSRF): the
    // allow-list applies to every request that changes something, not only to upgrades.
    if (!origin_allowed(ctx, req))
      return send(error_response(req, http::status::forbidden, "forbidden", "origin not allowed"),
                  "/v1/bookings");
    if (!who) return send(error_response(req, who.error()), "/v1/bookings");
    if (core_->stopping.load())  // draining: the bookings in flight finish, no new ones start here
      return send(error_response(req, http::status::service_unavailable, "overloaded", "shutting down"),
                  "/v1/bookings");
    boost::system::error_code ec;
    auto body = boost::json::parse(req.body(), ec);
    if (ec)
      return send(error_response(req, http::status::bad_request, "bad_request",
                                 fmt::format("body is not valid JSON: {}", ec.message())),
                  "/v1/bookings");
    auto request = booking_request_from_json(body, who->user);
    if (!request) return send(error_response(req, request.error()), "/v1/bookings");
    if (auto it = req.find("Idempotency-Key"); it != req.end()) {
      std::string key(it->value());
      if (key.size() >= 2 && key.front() == '"' && key.back() == '"')
        key = key.substr(1, key.size() - 2);  // sf-string
      if (!request->idempotency_key.empty() && request->idempotency_key != key)
        return send(error_response(req, http::status::bad_request, "bad_request",
                                   "Idempotency-Key header and idempotency_key in the body differ"),
                    "/v1/bookings");
      request->idempotency_key = key;
    }
    // The engine answers once the booking is stored; this thread does not wait for the store.
    submit_on_strand(
        ctx, std::move(*request),
        [self = this->shared_from_this()](std::function<void()> fn) {
          net::post(self->stream_.get_executor(), std::move(fn));
        },
        [self = this->shared_from_this(), req = std::move(req)](result<Ack> ack) {
          self->answer_booking(req, ack);
        });
    return;
  }
  const std::string id(rest.substr(1));
  const std::string route = "/v1/bookings/{id}";
  if (id.find('/') != std::string::npos)
    return send(error_response(req, http::status::not_found, "not_found", "no such route"), "other");
  if (req.method() != http::verb::get && req.method() != http::verb::delete_) {
    auto res = error_response(req, http::status::method_not_allowed, "bad_request", "use GET or DELETE");
    res.set(http::field::allow, "GET, DELETE");
    return send(std::move(res), route);
  }
  if (!who) return send(error_response(req, who.error()), route);
  auto booking = ctx.engine->get(id);
  if (!booking) return send(error_response(req, booking.error()), route);
  if (booking->user != who->user)
    return send(error_response(req, http::status::forbidden, "forbidden", "this booking is not yours"),
                route);

  if (req.method() == http::verb::delete_) {
    if (!origin_allowed(ctx, req))  // CSRF, as for POST
      return send(error_response(req, http::status::forbidden, "forbidden", "origin not allowed"), route);
    auto cancelled = cancel_idempotent(*ctx.engine, id);
    if (!cancelled) return send(error_response(req, cancelled.error()), route);
    auto res = json_response(req, http::status::ok, booking_body(*cancelled));
    res.set(http::field::etag, etag_of(*cancelled));
    return send(std::move(res), route);
  }

  const auto etag = etag_of(*booking);
  std::string if_none_match;
  if (auto it = req.find(http::field::if_none_match); it != req.end())
    if_none_match = std::string(it->value());
  const auto wait = long_poll_wait(url, ctx.options.max_long_poll);
  if (!wait) return send(error_response(req, wait.error()), route);
  const bool client_is_current = if_none_match == etag;
  // Long-poll while the client already has this version (If-None-Match), or, without one, while
  // the booking is still being decided.
  if (wait->count() > 0 &&
      (client_is_current || (if_none_match.empty() && booking->status == BookingStatus::processing)))
    return start_long_poll(req, *booking, *wait);
  if (client_is_current) {
    Response res{http::status::not_modified, req.version()};
    res.set(http::field::server, server_name);
    res.set(http::field::etag, etag);
    res.keep_alive(req.keep_alive() && !shutdown_requested_);
    return send(std::move(res), route);
  }
  auto res = json_response(req, http::status::ok, booking_body(*booking));
  res.set(http::field::etag, etag);
  send(std::move(res), route);
}

template <class Stream>
void HttpSession<Stream>::start_long_poll(const Request& req, const Booking& booking,
                                          std::chrono::seconds wait) {
  poll_.emplace();
  poll_->booking_id = booking.id;
  poll_->known_version = booking.version;
  poll_->http_version = req.version();
  poll_->keep_alive = req.keep_alive();
  poll_->timer = std::make_unique<net::steady_timer>(stream_.get_executor());
  poll_->timer->expires_after(wait);
  poll_->timer->async_wait([self = this->shared_from_this()](boost::system::error_code ec) {
    if (!ec) self->finish_long_poll(true);
  });
  // The current state first (a snapshot: from the bus, or from the store after a restart), then
  // every change; only a version newer than the client's wakes it, whatever the topic's
  // numbering (seq and version part ways after a restart).
  SubscribeOptions so;
  so.snapshot_source = snapshot_source(*core_->ctx, "booking/" + booking.id);
  std::weak_ptr<HttpSession> weak = this->shared_from_this();
  auto sub = core_->ctx->follow(
      "booking/" + booking.id,
      [weak, known = booking.version](const Delivery& d) {
        if (d.event) {
          const auto v = detail::payload_member(*d.event, "version");
          if (v.is_int64() && static_cast<std::uint64_t>(v.as_int64()) <= known) return;
        }
        if (auto self = weak.lock())
          net::post(self->stream_.get_executor(), [self] { self->finish_long_poll(false); });
      },
      so);
  if (sub) poll_->subscription = std::move(*sub);
}

template <class Stream>
void HttpSession<Stream>::finish_long_poll(bool timed_out) {
  if (!poll_) return;
  auto poll = std::move(*poll_);
  poll_.reset();
  poll.subscription.cancel();
  poll.timer->cancel();
  Request req;
  req.version(poll.http_version);
  req.keep_alive(poll.keep_alive);
  auto booking = core_->ctx->engine->get(poll.booking_id);
  if (!booking) return send(error_response(req, booking.error()), "/v1/bookings/{id}");
  if (timed_out && booking->version == poll.known_version) {
    Response res{http::status::not_modified, req.version()};
    res.set(http::field::server, server_name);
    res.set(http::field::etag, etag_of(*booking));
    res.keep_alive(poll.keep_alive && !shutdown_requested_);
    return send(std::move(res), "/v1/bookings/{id}");
  }
  auto res = json_response(req, http::status::ok, booking_body(*booking));
  res.set(http::field::etag, etag_of(*booking));
  send(std::move(res), "/v1/bookings/{id}");
}

template <class Stream>
void HttpSession<Stream>::route_resources(const Request& req, std::string_view rest) {
  const bool list = rest.empty() || rest == "/";
  const std::string route = list ? "/v1/resources" : "/v1/resources/{id}";
  if (req.method() != http::verb::get) {
    auto res = error_response(req, http::status::method_not_allowed, "bad_request", "use GET");
    res.set(http::field::allow, "GET");
    return send(std::move(res), route);
  }
  if (list) {
    boost::json::array all;
    for (const auto& r : core_->ctx->engine->resources()) all.push_back(to_json(r));
    return send(json_response(req, http::status::ok,
                              boost::json::serialize(boost::json::object{{"resources", std::move(all)}})),
                route);
  }
  auto r = core_->ctx->engine->resource(rest.substr(1));
  if (!r) return send(error_response(req, r.error()), route);
  send(json_response(req, http::status::ok, boost::json::serialize(to_json(*r))), route);
}

template <class Stream>
void HttpSession<Stream>::route_demo_token(const Request& req, const boost::urls::url_view& url) {
  const auto& options = core_->ctx->options;
  if (req.method() != http::verb::post) {
    auto res = error_response(req, http::status::method_not_allowed, "bad_request", "use POST");
    res.set(http::field::allow, "POST");
    return send(std::move(res), "/v1/demo/token");
  }
  // With a demo token that is still good, the same demo user gets a fresh one (a long-lived page
  // stays one user, and its bookings' topics stay its own); without one, a new demo user.
  std::string user;
  if (req.find(http::field::authorization) != req.end()) {
    auto who = auth(req, url, false);
    if (!who) return send(error_response(req, who.error()), "/v1/demo/token");
    if (!who->user.starts_with("demo-"))
      return send(error_response(req, http::status::forbidden, "forbidden", "only demo users renew here"),
                  "/v1/demo/token");
    user = std::move(who->user);
  } else {
    if (!core_->take_demo_user(std::chrono::steady_clock::now())) {
      auto res = error_response(req, http::status::too_many_requests, "rate_limited",
                                "too many new demo users; retry in a second");
      res.set(http::field::retry_after, "1");
      return send(std::move(res), "/v1/demo/token");
    }
    static constexpr std::string_view alphabet = "0123456789abcdefghjkmnpqrstvwxyz";
    thread_local std::mt19937_64 random{std::random_device{}()};
    user = "demo-";
    for (auto bits = random(), i = std::uint64_t{0}; i < 10; ++i, bits >>= 5) user += alphabet[bits & 31];
  }
  // Whole seconds, as the token's "exp" has them: expires_at says exactly when it stops working.
  const auto expires =
      std::chrono::floor<std::chrono::seconds>(std::chrono::system_clock::now() + options.demo_token_ttl);
  // Signed with the signing key of the keys in use now (set_keys() makes sure there is one).
  auto token = sign_token(user, expires, *core_->ctx->keys->get());
  if (!token) return send(error_response(req, token.error()), "/v1/demo/token");
  boost::json::object body{
      {"token", std::move(*token)},
      {"user", user},
      {"expires_at",
       std::chrono::duration_cast<std::chrono::milliseconds>(expires.time_since_epoch()).count()}};
  // Debug: a line per visitor (and per renewal) is not worth an operator's attention.
  core_->log(LogLevel::debug, fmt::format("demo token issued for {}", user));
  send(json_response(req, http::status::ok, boost::json::serialize(body)), "/v1/demo/token");
}

template <class Stream>
void HttpSession<Stream>::route_static(const Request& req, std::string path) {
  if (req.method() != http::verb::get && req.method() != http::verb::head)
    return send(error_response(req, http::status::method_not_allowed, "bad_request", "use GET"), "static");
  if (path.empty() || path.back() == '/') path += "index.html";
  if (path.find("..") != std::string::npos || path.find('\\') != std::string::npos ||
      path.find('\0') != std::string::npos)
    return send(error_response(req, http::status::bad_request, "bad_request", "bad path"), "static");
  // Regular files only: "/." or "/web" would open a directory (and answer 200 with nothing).
  const auto full = core_->ctx->options.static_dir + path;
  std::error_code fs_error;
  std::ifstream file;
  if (std::filesystem::is_regular_file(full, fs_error)) file.open(full, std::ios::binary);
  if (!file.is_open() || !file)
    return send(error_response(req, http::status::not_found, "not_found", "no such file"), "static");
  std::ostringstream content;
  content << file.rdbuf();
  Response res{http::status::ok, req.version()};
  res.set(http::field::server, server_name);
  res.set(http::field::content_type, content_type_for(path));
  res.set(http::field::cache_control, "no-cache");
  res.keep_alive(req.keep_alive() && !shutdown_requested_);
  if (req.method() != http::verb::head) res.body() = content.str();
  res.prepare_payload();
  send(std::move(res), "static");
}

template <class Stream>
void HttpSession<Stream>::answer_booking(const Request& req, const result<Ack>& ack) {
  if (!ack) return send(error_response(req, ack.error()), "/v1/bookings");
  boost::json::object out{{"booking_id", ack->booking_id}, {"status", to_string(ack->status)}};
  if (ack->replayed) out["replayed"] = true;
  auto res = json_response(req, http::status::accepted, boost::json::serialize(out));
  res.set(http::field::location, "/v1/bookings/" + ack->booking_id);
  if (ack->replayed) res.set("Idempotent-Replayed", "true");
  send(std::move(res), "/v1/bookings");
}

template <class Stream>
void HttpSession<Stream>::send(Response&& res, std::string_view route) {
  core_->metrics.count_request(route, static_cast<unsigned>(res.result_int()));
  if (const auto& node = core_->ctx->options.node_name; !node.empty()) res.set("Pushbook-Node", node);
  if (core_->ctx->options.access_log) route_ = std::string(route);
  response_ = std::move(res);
  const bool keep_alive = response_.keep_alive();
  beast::get_lowest_layer(stream_).expires_after(
      core_->ctx->options.idle_timeout);  // a client that does not read is cut
  http::async_write(stream_, response_,
                    [self = this->shared_from_this(), keep_alive](
                        boost::system::error_code ec, std::size_t n) { self->on_write(keep_alive, ec, n); });
}

template <class Stream>
void HttpSession<Stream>::on_write(bool keep_alive, boost::system::error_code ec, std::size_t bytes) {
  if (core_->ctx->options.access_log) {
    // The route's pattern, never the target: a token may be in the query.
    const auto ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started_).count();
    core_->access(fmt::format("http user={} peer={} method={} route={} status={} bytes={} ms={:.3f}{}",
                              user_.empty() ? "-" : user_, peer_address(socket_of(stream_)),
                              method_.empty() ? "-" : method_, route_, response_.result_int(), bytes, ms,
                              ec ? " write=failed" : ""));
  }
  if (ec) return do_close();
  if (!keep_alive || shutdown_requested_) return close_after_response(stream_, this->shared_from_this());
  response_ = {};
  do_read();
}

template <class Stream>
void HttpSession<Stream>::do_close() {
  close_now(stream_);
}

template class HttpSession<PlainStream>;
template class HttpSession<TlsStream>;

}  // namespace pushbook::detail
