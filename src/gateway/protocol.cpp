#include "gateway/protocol.hpp"

#include <fmt/format.h>
#include <atomic>
#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <charconv>
#include <cstddef>
#include <mutex>
#include <optional>

namespace pushbook::detail {

WireError wire_error(const std::error_code& ec) {
  if (ec.category() != error_category()) return {"internal", 500};
  switch (static_cast<errc>(ec.value())) {
    case errc::bad_request: return {"bad_request", 400};
    case errc::not_found: return {"not_found", 404};
    case errc::already_exists: return {"bad_request", 409};
    case errc::exceeds_capacity: return {"bad_request", 422};
    case errc::idempotency_conflict: return {"idempotency_conflict", 422};
    case errc::sold_out: return {"sold_out", 409};
    case errc::invalid_transition: return {"bad_request", 409};
    case errc::capacity_in_use: return {"bad_request", 409};
    case errc::overloaded: return {"overloaded", 503};
    case errc::slow_consumer: return {"overloaded", 503};
    case errc::invalid_topic: return {"bad_request", 400};
    case errc::shutting_down: return {"overloaded", 503};
    // The store cannot be reached or written (PostgreSQL down, a disk full): nothing was stored,
    // and a retry after a while may well succeed.
    case errc::store_failed: return {"overloaded", 503};
    case errc::unauthorized: return {"unauthorized", 401};
    case errc::forbidden: return {"forbidden", 403};
    case errc::rate_limited: return {"rate_limited", 429};
    case errc::too_large: return {"too_large", 413};
    case errc::internal: return {"internal", 500};
    case errc::quota_exceeded: return {"quota_exceeded", 429};
    // The bus's backend is away: like an overload to a client, who retries after a while.
    case errc::bus_unavailable: return {"overloaded", 503};
  }
  return {"internal", 500};
}

std::string http_error_body(std::string_view code, std::string_view message) {
  return boost::json::serialize(boost::json::object{{"error", {{"code", code}, {"message", message}}}});
}

namespace {
// {"type":"reply","id":ID,"ok":true,"result": with room for `more` bytes after it.
std::string reply_head(const boost::json::value& id, std::size_t more) {
  constexpr std::string_view head = R"({"type":"reply","id":)", ok = R"(,"ok":true,"result":)";
  std::string out;
  out.reserve(head.size() + 20 + ok.size() + more + 1);
  out += head;
  if (id.is_int64())
    append_int(out, id.get_int64());
  else if (id.is_uint64())
    append_int(out, id.get_uint64());
  else
    out += boost::json::serialize(id);
  out += ok;
  return out;
}
}  // namespace

// Written out rather than serialized from an object made for it: a reply per request, and the
// object would cost an allocation per key.
std::string reply_ok(const boost::json::value& id, const boost::json::object& result) {
  auto out = reply_head(id, 64);
  out += boost::json::serialize(result);
  out += '}';
  return out;
}

std::string reply_booked(const boost::json::value& id, const Ack& ack) {
  // {"booking_id":...,"status":...,"seq":N[,"replayed":true]} as the result, written out (a reply
  // per booking).
  const std::string_view status = to_string(ack.status);
  auto out = reply_head(id, 80 + ack.booking_id.size() + status.size());
  out += R"({"booking_id":)";
  append_json_string(out, ack.booking_id);
  out += R"(,"status":")";
  out += status;  // a name of the enum: nothing to escape
  out += R"(","seq":)";
  append_int(out, ack.version);
  if (ack.replayed) out += R"(,"replayed":true)";
  out += "}}";
  return out;
}

std::string reply_error(const boost::json::value& id, std::string_view code, std::string_view message) {
  return boost::json::serialize(boost::json::object{
      {"type", "reply"}, {"id", id}, {"ok", false}, {"error", {{"code", code}, {"message", message}}}});
}

result<std::shared_ptr<const KeySet>> keys_from_options(GatewayOptions& options) {
  if (!options.secret.empty() && options.keys)
    return Error(errc::bad_request, "give GatewayOptions::secret or GatewayOptions::keys, not both");
  std::shared_ptr<const KeySet> keys =
      options.keys             ? std::move(options.keys)
      : options.secret.empty() ? nullptr
                               : std::make_shared<const KeySet>(KeySet::from_secret(options.secret));
  if (keys && keys->empty()) return Error(errc::bad_request, "GatewayOptions::keys is an empty key set");
  return keys;
}

// --- GatewayContext --------------------------------------------------------------------------

result<TokenClaims> GatewayContext::verify(std::string_view token) const {
  if (auto current = keys->get())
    return verify_token(token, *current, std::chrono::system_clock::now(), options.token_leeway);
  if (!options.dev_insecure)
    return Error(errc::unauthorized, "the gateway has no keys to verify tokens with");
  // Development mode: no signature check, and the token never expires on the connection.
  auto claims = read_token_unverified(token);
  if (claims) claims->expires_at = std::chrono::system_clock::time_point::max();
  return claims;
}

void GatewayContext::submit_async(BookingRequest request, std::function<void(result<Ack>)> done) const {
  if (backend) return backend->submit_async(std::move(request), std::move(done));
  engine->submit_async(std::move(request), std::move(done));
}

result<Booking> GatewayContext::booking(std::string_view booking_id) const {
  return backend ? backend->get(booking_id) : engine->get(booking_id);
}

result<Booking> GatewayContext::cancel(std::string_view booking_id) const {
  return backend ? backend->cancel(booking_id) : cancel_idempotent(*engine, booking_id);
}

result<Subscription> GatewayContext::follow(const std::string& topic, DeliveryCallback callback,
                                            SubscribeOptions so) const {
  if (backend) return backend->follow(topic, std::move(callback), std::move(so));
  if (!so.snapshot_source) so.snapshot_source = snapshot_source(*this, topic);
  if (hub) return hub->subscribe(topic, std::move(callback), std::move(so));
  so.executor = inline_executor();
  return bus->subscribe(topic, std::move(callback), std::move(so));
}

std::optional<std::vector<EventPtr>> GatewayContext::history_if_local(std::string_view topic,
                                                                      std::uint64_t since_seq) const {
  if (backend || !bus) return std::nullopt;
  return bus->history_if_local(topic, since_seq);
}

bool GatewayContext::may_subscribe(std::string_view user, std::string_view topic) const {
  if (options.authorize) return options.authorize(user, topic);
  std::optional<std::string> owner;
  if (topic.starts_with("booking/")) {
    if (auto b = booking(topic.substr(8))) owner = b->user;
  }
  return default_topic_rule(user, topic, owner);
}

// --- ConnectionLogic -------------------------------------------------------------------------

ConnectionLogic::ConnectionLogic(std::shared_ptr<const GatewayContext> ctx,
                                 std::weak_ptr<ConnectionSink> sink, std::string user,
                                 std::optional<std::chrono::system_clock::time_point> token_expires)
    : ctx_(std::move(ctx)),
      sink_(std::move(sink)),
      user_(std::move(user)),
      tokens_(static_cast<double>(ctx_->options.rate_limit_burst)),
      refilled_(steady::now()) {
  set_expiry(token_expires, steady::now());
}

ConnectionLogic::~ConnectionLogic() { unsubscribe_all(); }

void ConnectionLogic::unsubscribe_all() {
  ctx_->metrics->subscriptions.fetch_sub(static_cast<std::int64_t>(subscriptions_.size()));
  subscriptions_.clear();  // each Subscription cancels itself
}

void ConnectionLogic::set_expiry(std::optional<std::chrono::system_clock::time_point> expires,
                                 steady::time_point now) {
  in_grace_ = false;
  if (!expires || *expires == std::chrono::system_clock::time_point::max()) {
    deadline_.reset();
    return;
  }
  const auto left = *expires - std::chrono::system_clock::now();
  if (left > std::chrono::hours(24 * 365 * 100)) {  // a far-future exp: no deadline (and no overflow)
    deadline_.reset();
    return;
  }
  deadline_ = now + std::chrono::duration_cast<steady::duration>(left);
}

void ConnectionLogic::on_deadline(steady::time_point now) {
  if (!deadline_ || now < *deadline_) return;
  auto sink = sink_.lock();
  if (!sink) return;
  if (!in_grace_) {
    in_grace_ = true;
    deadline_ = now + ctx_->options.token_refresh_grace;
    sink->send_text(std::make_shared<const std::string>(boost::json::serialize(boost::json::object{
        {"type", "notice"},
        {"code", "token_expired"},
        {"message", fmt::format("token expired: send {{\"op\":\"refresh\",\"token\":...}} within {} ms",
                                ctx_->options.token_refresh_grace.count())}})));
    return;
  }
  deadline_.reset();
  sink->close(4001, "token expired");
}

void ConnectionLogic::reply(const boost::json::value& id, const boost::json::object& result) {
  if (auto sink = sink_.lock()) sink->send_text(std::make_shared<const std::string>(reply_ok(id, result)));
}

void ConnectionLogic::fail(const boost::json::value& id, std::string_view code, std::string_view message) {
  ctx_->metrics->client_errors.fetch_add(1, std::memory_order_relaxed);
  if (auto sink = sink_.lock())
    sink->send_text(std::make_shared<const std::string>(reply_error(id, code, message)));
}

void ConnectionLogic::fail(const boost::json::value& id, const Error& e) {
  fail(id, wire_error(e.code).code, e.message);
}

bool ConnectionLogic::take_token(steady::time_point now) {
  const double rate = ctx_->options.rate_limit_per_second;
  const double burst = static_cast<double>(ctx_->options.rate_limit_burst);
  const double elapsed = std::chrono::duration<double>(now - refilled_).count();
  tokens_ = std::min(burst, tokens_ + elapsed * rate);
  strikes_ = std::max(0.0, strikes_ - elapsed * rate);  // forgiven at the allowed rate
  refilled_ = now;
  if (tokens_ >= 1.0) {
    tokens_ -= 1.0;
    return true;
  }
  return false;
}

bool ConnectionLogic::admit(steady::time_point now) {
  ctx_->metrics->client_messages.fetch_add(1, std::memory_order_relaxed);
  if (take_token(now)) return true;
  ctx_->metrics->rate_limited.fetch_add(1, std::memory_order_relaxed);
  // Keep sending while refused and the connection goes: a client gets one burst of grace, and
  // the refill that lets a message through now and then does not reset it.
  strikes_ += 1.0;
  if (strikes_ > static_cast<double>(ctx_->options.rate_limit_burst)) {
    if (auto sink = sink_.lock()) sink->close(1008, "rate limit exceeded");
    return false;
  }
  fail(nullptr, "rate_limited",
       fmt::format("more than {} messages per second; slow down", ctx_->options.rate_limit_per_second));
  return false;
}

void ConnectionLogic::on_binary(steady::time_point now) {
  if (!admit(now)) return;
  fail(nullptr, "bad_request", "binary frames are not supported; send JSON text");
}

namespace {
// A request's JSON is parsed into a block of its thread's and lives only while the request is
// handled (handlers copy what they keep, by assignment: a copy-constructed JSON value would use
// the block too): no allocation per JSON element. A request handled while another is on the same
// thread (a host's send callback feeding a ProtocolSession) is parsed onto the heap.
struct RequestBlock {
  alignas(std::max_align_t) unsigned char bytes[4096];
  bool in_use = false;
};
}  // namespace

void ConnectionLogic::on_message(std::string_view text, steady::time_point now) {
  if (!admit(now)) return;
  thread_local RequestBlock block;
  std::optional<boost::json::monotonic_resource> arena;  // before v: outlives it
  boost::json::storage_ptr storage;
  if (!block.in_use) {
    arena.emplace(block.bytes, sizeof block.bytes);
    storage = boost::json::storage_ptr(&*arena);
  }
  struct Release {
    RequestBlock* b;
    ~Release() {
      if (b) b->in_use = false;
    }
  } release{arena ? &block : nullptr};
  if (arena) block.in_use = true;
  boost::system::error_code ec;
  auto v = boost::json::parse(text, ec, storage);
  if (ec) return fail(nullptr, "bad_request", fmt::format("not valid JSON: {}", ec.message()));
  if (!v.is_object()) return fail(nullptr, "bad_request", "a client message must be a JSON object");
  const auto& msg = v.as_object();
  boost::json::value id = nullptr;
  if (auto i = msg.if_contains("id")) {
    if (!i->is_int64() && !i->is_uint64()) return fail(nullptr, "bad_request", "\"id\" must be an integer");
    id = *i;
  } else {
    return fail(nullptr, "bad_request", "every request needs an integer \"id\"");
  }
  auto op = msg.if_contains("op");
  if (!op || !op->is_string()) return fail(id, "bad_request", "every request needs a string \"op\"");
  handle(msg, id, op->get_string());
}

void ConnectionLogic::handle(const boost::json::object& msg, const boost::json::value& id,
                             std::string_view op) {
  if (op == "book") return op_book(msg, id);
  if (op == "subscribe") return op_subscribe(msg, id);
  if (op == "unsubscribe") return op_unsubscribe(msg, id);
  if (op == "cancel") return op_cancel(msg, id);
  if (op == "refresh") return op_refresh(msg, id);
  if (op == "ping") {
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::system_clock::now().time_since_epoch());
    return reply(id, {{"pong", true}, {"time", ms.count()}});
  }
  fail(
      id, "bad_request",
      fmt::format("unknown op '{}' (book, subscribe, unsubscribe, cancel, ping, refresh)", op.substr(0, 64)));
}

void ConnectionLogic::op_book(const boost::json::object& msg, const boost::json::value& id) {
  if (ctx_->draining->load())
    return fail(id, "overloaded", "the server is shutting down; book again once reconnected");
  auto req = booking_request_from_json(msg, user_);
  if (!req) return fail(id, req.error());
  if (subscriptions_.size() >= ctx_->options.max_subscriptions)
    return fail(id, "too_large",
                fmt::format("at most {} subscriptions per connection; unsubscribe first",
                            ctx_->options.max_subscriptions));
  bool until_decision = false;
  if (auto f = msg.if_contains("follow"); f && !f->is_null()) {
    if (f->is_string() && f->get_string() == "decision")
      until_decision = true;
    else if (!f->is_string() || f->get_string() != "all")
      return fail(id, "bad_request", "\"follow\" is \"all\" (the default) or \"decision\"");
  }
  std::weak_ptr<ConnectionSink> weak = sink_;
  submit_on_strand(
      *ctx_, std::move(*req),
      [weak](std::function<void()> fn) {
        if (auto sink = weak.lock()) sink->post(std::move(fn));
      },
      // Runs on the strand while the connection (which owns this logic) is alive: the sink's post
      // runs nothing once it has finished.
      [this, id, until_decision](result<Ack> ack) { on_booked(id, std::move(ack), until_decision); });
}

void ConnectionLogic::on_booked(const boost::json::value& id, result<Ack> ack, bool until_decision) {
  if (!ack) return fail(id, ack.error());
  // Several books may have been in flight: the subscription cap holds for them too. The booking
  // is made; the client follows it with a subscribe once it has room.
  const auto topic = "booking/" + ack->booking_id;
  const bool room = subscriptions_.size() < ctx_->options.max_subscriptions || subscriptions_.contains(topic);
  // "seq": the version the ACK reports, which is also that version's seq on booking/<id> (the
  // engine numbers the topic with the booking's versions, in every epoch): where the client
  // stands on the topic, to resume from with `since` after a reconnect.
  if (auto sink = sink_.lock()) sink->send_text(std::make_shared<const std::string>(reply_booked(id, *ack)));
  if (!room) {
    if (auto sink = sink_.lock())
      sink->send_text(std::make_shared<const std::string>(boost::json::serialize(boost::json::object{
          {"type", "notice"},
          {"code", "subscription_ended"},
          {"topic", topic},
          {"message", fmt::format("at most {} subscriptions per connection; unsubscribe from one, then "
                                  "subscribe to '{}' to follow this booking",
                                  ctx_->options.max_subscriptions, topic)}})));
    return;
  }
  // Already following it (a retry of a booking this connection follows): that subscription goes
  // on from where the client stands.
  if (subscriptions_.contains(topic)) return;
  // The decision follows on this socket. A new booking's ACK is its processing state, so the
  // subscription resumes from it (since = that version's seq, in whatever epoch the topic is):
  // the next message on the topic is the change after it, replayed if the booking was decided
  // before the subscription started, live otherwise; where the bus's rules give a snapshot
  // instead (nothing of the topic on the bus yet: the ACK's event is still on its way there, or
  // was refused and waits for its retry; history that does not reach back; a numbering that
  // restarted) the snapshot comes, unless it says no more than the ACK did. Nothing of a version
  // at or below the ACK's is sent: the client never gets the processing state a second time.
  // An idempotent retry's ACK says only the status of a booking that may be decided already
  // (no reason, no hold expiry): the subscription starts just before that version, so that the
  // state it reports comes first, whole, as an event (or a snapshot where the bus's rules give
  // one), then what follows; the client takes the state from there, once.
  const auto known = ack->replayed ? ack->version - 1 : ack->version;
  if (until_decision && send_decided(topic, known)) return;
  subscribe(topic, known, std::nullopt, known, until_decision);
}

namespace {
// A booking state past processing (confirmed, rejected, cancelled, expired...): what a "follow":
// "decision" subscription ends after.
bool is_decided(const Event& event) {
  // Read from the payload's text when it is kept as text: no value made and kept for it.
  const auto status = payload_member(event, "status");
  return status.is_string() && status.get_string() != "processing";
}
}  // namespace

bool ConnectionLogic::send_decided(const std::string& topic, std::uint64_t known) {
  // A booking decided before its ACK came back (the engine decides on the submitting thread when
  // no business step is configured): with a bus that holds its history in memory, the events
  // after the ACK's version are there already. When they run from known + 1 without a gap up to
  // a decision, they are sent from there, as the subscription would have replayed them, and no
  // subscription is made (none to make, feed and end per booking). Otherwise nothing is sent and
  // the caller subscribes.
  auto events = ctx_->history_if_local(topic, known);
  if (!events) return false;
  std::size_t upto = 0;
  for (std::uint64_t expected = known + 1; upto < events->size(); ++upto, ++expected) {
    const auto& ev = (*events)[upto];
    if (ev->seq() != expected) return false;
    if (is_decided(*ev)) break;
  }
  if (upto == events->size()) return false;  // not decided yet: the subscription follows it
  auto sink = sink_.lock();
  if (!sink) return true;
  for (std::size_t i = 0; i <= upto; ++i) sink->send_event_once((*events)[i]);
  return true;
}

void submit_on_strand(const GatewayContext& ctx, BookingRequest request,
                      std::function<void(std::function<void()>)> post,
                      std::function<void(result<Ack>)> then) {
  struct state {
    std::shared_ptr<PendingSubmits> pending;
    explicit state(std::shared_ptr<PendingSubmits> p) : pending(std::move(p)) { pending->begin(); }
    ~state() { pending->end(); }  // the answer was handled, or dropped with the connection
    state(const state&) = delete;
    state& operator=(const state&) = delete;
    std::mutex mutex;
    bool returned = false;             // submit_async() has returned
    std::optional<result<Ack>> early;  // the answer, when it came before that
    std::function<void(result<Ack>)> then;
    std::function<void(std::function<void()>)> post;
  };
  auto st = std::make_shared<state>(ctx.pending_submits);
  st->then = std::move(then);
  st->post = std::move(post);
  ctx.submit_async(std::move(request), [st](result<Ack> r) {
    std::unique_lock lock(st->mutex);
    if (!st->returned) {
      st->early.emplace(std::move(r));
      return;
    }
    lock.unlock();
    st->post([st, r = std::move(r)]() mutable { st->then(std::move(r)); });
  });
  std::unique_lock lock(st->mutex);
  st->returned = true;
  if (!st->early) return;
  auto r = std::move(*st->early);
  lock.unlock();
  st->then(std::move(r));
}

void ConnectionLogic::op_subscribe(const boost::json::object& msg, const boost::json::value& id) {
  auto t = msg.if_contains("topic");
  if (!t || !t->is_string()) return fail(id, "bad_request", "subscribe needs a string \"topic\"");
  const std::string topic(t->get_string());
  if (!is_valid_topic(topic))
    return fail(id, "bad_request", "invalid topic: '/'-separated segments of letters, digits and -_.:@+=~");
  std::optional<std::uint32_t> epoch;
  if (auto e = msg.if_contains("epoch"); e && !e->is_null()) {
    if (!e->is_string() || !(epoch = parse_epoch(e->get_string())))
      return fail(id, "bad_request", "\"epoch\" must be the epoch string of an event (8 hex digits)");
  }
  std::optional<std::uint64_t> since;
  if (auto s = msg.if_contains("since"); s && !s->is_null()) {
    if (s->is_uint64())
      since = s->get_uint64();
    else if (s->is_int64() && s->get_int64() >= 0)
      since = static_cast<std::uint64_t>(s->get_int64());
    else
      return fail(id, "bad_request", "\"since\" must be a non-negative integer (a sequence number)");
  }
  if (!ctx_->may_subscribe(user_, topic))
    return fail(id, "forbidden", fmt::format("you may not subscribe to '{}'", topic));
  if (!subscriptions_.contains(topic) && subscriptions_.size() >= ctx_->options.max_subscriptions)
    return fail(id, "too_large",
                fmt::format("at most {} subscriptions per connection; unsubscribe first",
                            ctx_->options.max_subscriptions));
  reply(id, {{"topic", topic}});
  subscribe(topic, since, epoch);
}

void ConnectionLogic::op_unsubscribe(const boost::json::object& msg, const boost::json::value& id) {
  auto t = msg.if_contains("topic");
  if (!t || !t->is_string()) return fail(id, "bad_request", "unsubscribe needs a string \"topic\"");
  auto it = subscriptions_.find(std::string_view(t->get_string()));
  if (it == subscriptions_.end())
    return fail(id, "not_found",
                fmt::format("not subscribed to '{}'", std::string_view(t->get_string()).substr(0, 300)));
  subscriptions_.erase(it);
  ctx_->metrics->subscriptions.fetch_sub(1);
  reply(id, {{"topic", t->get_string()}});
}

void ConnectionLogic::op_cancel(const boost::json::object& msg, const boost::json::value& id) {
  auto b = msg.if_contains("booking_id");
  if (!b || !b->is_string()) return fail(id, "bad_request", "cancel needs a string \"booking_id\"");
  const std::string_view booking_id = b->get_string();
  auto booking = ctx_->booking(booking_id);
  if (!booking) return fail(id, booking.error());
  if (booking->user != user_) return fail(id, "forbidden", "you may cancel only your own bookings");
  auto r = ctx_->cancel(booking_id);
  if (!r) return fail(id, r.error());
  reply(id, to_json(*r));
}

void ConnectionLogic::op_refresh(const boost::json::object& msg, const boost::json::value& id) {
  auto t = msg.if_contains("token");
  if (!t || !t->is_string()) return fail(id, "bad_request", "refresh needs a string \"token\"");
  auto claims = ctx_->verify(t->get_string());
  if (!claims) return fail(id, claims.error());
  if (claims->subject != user_) return fail(id, "forbidden", "a refreshed token must be for the same user");
  set_expiry(claims->expires_at, steady::now());
  const auto ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(claims->expires_at.time_since_epoch());
  reply(id, {{"expires_at", ms.count()}});
}

std::function<std::shared_ptr<const boost::json::value>()> snapshot_source(const GatewayContext& ctx,
                                                                           std::string_view topic) {
  // Only booking topics: their state lives in the store, which is read without any engine lock
  // (the source runs under the bus's topic lock). Resource topics are published by the engine at
  // start, so the bus has them.
  if (!topic.starts_with("booking/")) return {};
  return [engine = ctx.engine,
          id = std::string(topic.substr(8))]() -> std::shared_ptr<const boost::json::value> {
    // A state the engine has not published yet would come ahead of its own events (a snapshot
    // of the decision, then the processing event): nothing now, the events follow in order.
    if (engine->publishing(id)) return nullptr;
    auto b = engine->get(id);
    if (!b) return nullptr;
    return std::make_shared<const boost::json::value>(to_json(*b));
  };
}

namespace {
// A booking event's "version" (0 when it has none).
std::uint64_t version_of(const Event& event) {
  const auto v = payload_member(event, "version");
  if (v.is_uint64()) return v.as_uint64();  // a host's own events may carry it unsigned
  return v.is_int64() && v.as_int64() > 0 ? static_cast<std::uint64_t>(v.as_int64()) : 0;
}
}  // namespace

result<Booking> cancel_idempotent(BookingEngine& engine, std::string_view booking_id) {
  auto r = engine.cancel(booking_id);
  if (r || !r.error().is(errc::invalid_transition)) return r;
  auto now = engine.get(booking_id);
  if (now && now->status == BookingStatus::cancelled) return std::move(*now);
  return r;
}

BookingVersionFilter::BookingVersionFilter(std::string_view topic, std::optional<std::uint64_t> since,
                                           std::uint64_t known)
    : highest_(topic.starts_with("booking/")
                   ? std::make_shared<std::atomic<std::uint64_t>>(
                         std::max<std::uint64_t>(known, since && *since > 0 ? *since - 1 : 0))
                   : nullptr) {}

bool BookingVersionFilter::stale(const Delivery& d) const {
  if (!highest_ || !d.event) return false;
  const auto version = version_of(*d.event);
  if (version == 0) return false;  // not a booking state: not ours to judge
  if (version <= highest_->load(std::memory_order_relaxed)) return true;
  highest_->store(version, std::memory_order_relaxed);
  return false;
}

result<ResumePoint> parse_resume_point(std::optional<std::string_view> last_event_id, std::string_view since,
                                       std::string_view epoch) {
  std::string since_text, epoch_text;
  if (last_event_id) {
    since_text = std::string(*last_event_id);
    if (auto colon = since_text.find(':'); colon != std::string::npos) {
      epoch_text = since_text.substr(0, colon);
      since_text.erase(0, colon + 1);
      if (epoch_text.empty()) epoch_text = "-";  // refused below
    }
  } else {
    since_text = std::string(since);
    epoch_text = std::string(epoch);
  }
  ResumePoint out;
  if (!since_text.empty()) {
    std::uint64_t n = 0;
    const auto [end, err] = std::from_chars(since_text.data(), since_text.data() + since_text.size(), n);
    if (err != std::errc() || end != since_text.data() + since_text.size())
      return Error(errc::bad_request, "Last-Event-ID / since must be a sequence number (EPOCH:SEQ or SEQ)");
    out.since = n;
  }
  if (!epoch_text.empty() && !(out.epoch = parse_epoch(epoch_text)))
    return Error(errc::bad_request, "the epoch of Last-Event-ID / ?epoch= must be 8 hex digits");
  return out;
}

std::string sse_event(const Event& event, bool snapshot) {
  // No "event:" line: everything arrives as a plain message (EventSource.onmessage); the JSON
  // says whether it is a snapshot. "id: EPOCH:SEQ" lets EventSource resume with Last-Event-ID, and
  // the server tell a seq of another numbering (a restart) from one of this.
  const auto& wire = *event.wire(snapshot);
  std::string chunk;
  chunk.reserve(wire.size() + 32);
  fmt::format_to(std::back_inserter(chunk), "id: {}:{}\ndata: ", format_epoch(event.epoch()), event.seq());
  chunk += wire;
  chunk += '\n';
  return chunk;
}

result<Subscription> follow_for_events(const GatewayContext& ctx, const std::string& topic,
                                       ResumePoint resume, std::weak_ptr<ConnectionSink> sink) {
  SubscribeOptions so;
  so.since_seq = resume.since;
  so.since_epoch = resume.epoch;
  const BookingVersionFilter filter(topic, resume.since);
  return ctx.follow(
      topic,
      [weak = std::move(sink), filter](const Delivery& d) {
        auto s = weak.lock();
        if (!s) return;
        if (d.event) {
          if (!filter.stale(d)) s->send_event(d.event, d.kind == Delivery::Kind::snapshot);
          return;
        }
        if (d.kind == Delivery::Kind::gap)
          s->send_text(std::make_shared<const std::string>(
              fmt::format(R"({{"type":"gap","dropped":{}}})", d.dropped)));
        else
          s->close(1011, d.reason.message);
      },
      so);
}

void ConnectionLogic::subscribe(const std::string& topic, std::optional<std::uint64_t> since,
                                std::optional<std::uint32_t> epoch, std::uint64_t known_version,
                                bool until_decision) {
  auto it = subscriptions_.find(topic);
  if (it != subscriptions_.end()) {
    subscriptions_.erase(it);  // replaced below: e.g. a resubscribe with `since` after a gap
    ctx_->metrics->subscriptions.fetch_sub(1);
  }
  SubscribeOptions so;
  so.since_seq = since;
  so.since_epoch = epoch;
  // Events go straight into the connection's bounded send queue on the delivering thread (one
  // bus subscription per topic for the whole node, see topic_hub.hpp); the queue (not the bus)
  // applies the slow-consumer policy.
  std::weak_ptr<ConnectionSink> weak = sink_;
  const BookingVersionFilter filter(topic, since, known_version);
  auto stale = [filter](const Delivery& d) { return filter.stale(d); };
  const auto generation = ++generations_;
  // Deliveries of one follower never run concurrently, so `ended` needs no lock.
  auto sub = ctx_->follow(
      topic,
      [this, weak, topic, stale, until_decision, generation, ended = false](const Delivery& d) mutable {
        if (ended) return;
        auto sink = weak.lock();
        if (!sink) return;
        switch (d.kind) {
          case Delivery::Kind::event:
          case Delivery::Kind::snapshot:
            if (stale(d)) break;
            sink->send_event(d.event, d.kind == Delivery::Kind::snapshot);
            if (until_decision && is_decided(*d.event)) {
              // The decision was the last message of this topic for the client: the subscription
              // ends on the connection's strand (where this logic lives while the sink runs posts).
              ended = true;
              sink->post([this, topic, generation] {
                auto found = subscriptions_.find(topic);
                if (found == subscriptions_.end() || found->second.generation != generation) return;
                subscriptions_.erase(found);
                ctx_->metrics->subscriptions.fetch_sub(1);
              });
            }
            break;
          case Delivery::Kind::gap:
            sink->send_text(std::make_shared<const std::string>(boost::json::serialize(boost::json::object{
                {"type", "gap"}, {"topics", boost::json::array{topic}}, {"dropped", d.dropped}})));
            break;
          case Delivery::Kind::ended:
            sink->send_text(std::make_shared<const std::string>(
                boost::json::serialize(boost::json::object{{"type", "notice"},
                                                           {"code", "subscription_ended"},
                                                           {"topic", topic},
                                                           {"message", d.reason.message}})));
            break;
        }
      },
      so);
  if (!sub) {
    if (auto sink = sink_.lock())
      sink->send_text(std::make_shared<const std::string>(
          boost::json::serialize(boost::json::object{{"type", "notice"},
                                                     {"code", "subscription_ended"},
                                                     {"topic", topic},
                                                     {"message", sub.error().message}})));
    return;
  }
  subscriptions_.emplace(topic, Followed{std::move(*sub), generation});
  ctx_->metrics->subscriptions.fetch_add(1);
}

}  // namespace pushbook::detail
