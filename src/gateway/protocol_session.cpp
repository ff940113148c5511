// ProtocolSession: ConnectionLogic (the gateway's protocol code) driven by a host's own
// WebSocket server. The host's calls are serialized by `logic_mutex`; events and booking answers
// arrive on other threads and only queue (OutboundQueue, `posted`) and wake the host.
#include <pushbook/protocol_session.hpp>

#include "gateway/outbound_queue.hpp"
#include "gateway/protocol.hpp"

#include <fmt/format.h>

#include <atomic>
#include <cmath>
#include <mutex>
#include <vector>

namespace pushbook {

struct ProtocolHost::impl {
  std::shared_ptr<detail::GatewayContext> ctx;
  detail::GatewayMetrics metrics;
};

result<std::shared_ptr<ProtocolHost>> ProtocolHost::create(std::shared_ptr<BookingEngine> engine,
                                                           EventBusPtr bus, GatewayOptions options) {
  if (!engine) return Error(errc::bad_request, "ProtocolHost needs a booking engine");
  if (!bus) return Error(errc::bad_request, "ProtocolHost needs an event bus");
  if (options.max_message_bytes == 0 || options.max_queued_bytes == 0 || options.max_subscriptions == 0 ||
      options.rate_limit_burst == 0 || !(options.rate_limit_per_second > 0) ||
      std::isinf(options.rate_limit_per_second))
    return Error(errc::bad_request,
                 "limits must be positive (max_message_bytes, max_queued_bytes, max_subscriptions, "
                 "rate_limit_per_second, rate_limit_burst)");
  auto keys = detail::keys_from_options(options);
  if (!keys) return keys.error();
  auto p = std::make_shared<impl>();
  auto ctx = std::make_shared<detail::GatewayContext>();
  ctx->bus = std::move(bus);
  ctx->hub = std::make_shared<detail::TopicHub>(ctx->bus, 64, 65536);
  ctx->engine = std::move(engine);
  // The host authenticated its users; a refresh token is verified only with keys it gave.
  options.dev_insecure = false;
  ctx->options = std::move(options);
  ctx->metrics = &p->metrics;
  ctx->keys->set(std::move(*keys));
  p->ctx = std::move(ctx);
  return std::shared_ptr<ProtocolHost>(new ProtocolHost(std::move(p)));
}

ProtocolHost::ProtocolHost(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
ProtocolHost::~ProtocolHost() = default;

void ProtocolHost::drain() { impl_->ctx->draining->store(true); }

std::string ProtocolHost::metrics_text() const {
  const auto stats = impl_->ctx->engine->stats();
  auto text = impl_->metrics.render(&stats, impl_->ctx->bus.get());
  detail::GatewayMetrics::render_topic_hub(text, impl_->ctx->hub->stats());
  return text;
}

std::size_t ProtocolHost::sessions() const {
  return static_cast<std::size_t>(std::max<std::int64_t>(
      0, impl_->metrics.websocket_connections.load() + impl_->metrics.sse_connections.load()));
}

struct ProtocolSession::impl : detail::ConnectionSink {
  // `events`: an SSE stream (the disconnect policy always: EventSource resumes from its
  // Last-Event-ID, so dropping with a gap would lose what a reconnect gets back).
  impl(std::shared_ptr<ProtocolHost::impl> h, std::string u, std::function<void()> w, bool ev)
      : host(std::move(h)),
        wake(std::move(w)),
        user(std::move(u)),
        events(ev),
        out(host->ctx->options.max_queued_bytes,
            ev ? SlowConsumerPolicy::disconnect : host->ctx->options.slow_consumer, &host->metrics) {
    (events ? host->metrics.sse_connections : host->metrics.websocket_connections).fetch_add(1);
    host->metrics.connections_total.fetch_add(1);
  }
  ~impl() override { uncount(); }
  // The session counts as open (ProtocolHost::sessions, the connection gauges) until it is
  // finished, even while the host still holds the object.
  void uncount() {
    if (counted.exchange(false))
      (events ? host->metrics.sse_connections : host->metrics.websocket_connections).fetch_sub(1);
  }

  // The host's wake, called under wake_mutex: once finish() has returned it is never called
  // again, so a host may destroy what it captured as soon as the session is closed.
  void notify() {
    std::lock_guard lock(wake_mutex);
    if (wake) wake();
  }

  // --- ConnectionSink: any thread --------------------------------------------------------------
  void push(std::shared_ptr<const std::string> bytes, const EventPtr& event) {
    auto pushed = out.push(std::move(bytes), event);
    if (pushed.too_slow) return close(1013, std::move(*pushed.too_slow));
    if (pushed.wake) notify();
  }
  void send_text(std::shared_ptr<const std::string> message) override {
    if (events) return push(std::make_shared<const std::string>("data: " + *message + "\n"), nullptr);
    push(std::move(message), nullptr);
  }
  void send_event(const EventPtr& event, bool snapshot) override {
    if (events) return push(std::make_shared<const std::string>(detail::sse_event(*event, snapshot)), event);
    push(event->wire(snapshot), event);
  }
  void send_event_once(const EventPtr& event) override {
    if (events) return send_event(event, false);
    push(event->wire_once(false), event);
  }
  void close(std::uint16_t code, std::string reason) override {
    {
      std::lock_guard lock(state_mutex);
      if (finished || close_requested) return;
      close_requested = Close{code, std::move(reason)};
    }
    out.close(false);  // what is queued goes first, then the close
    notify();
  }
  void post(std::function<void()> fn) override {
    bool first = false;
    {
      std::lock_guard lock(state_mutex);
      if (finished) return;
      first = posted.empty();
      posted.push_back(std::move(fn));
    }
    if (first) notify();
  }

  // --- The host's side: under logic_mutex ------------------------------------------------------
  void finish() {
    {
      std::lock_guard lock(state_mutex);
      if (finished) return;
      finished = true;
      posted.clear();
    }
    out.close(true);
    {
      std::lock_guard lock(wake_mutex);
      wake = nullptr;
    }
    uncount();
    if (logic) logic->unsubscribe_all();
    if (subscription.active()) {
      subscription.cancel();
      host->metrics.subscriptions.fetch_sub(1);
    }
  }

  std::shared_ptr<ProtocolHost::impl> host;
  std::mutex wake_mutex;
  std::function<void()> wake;  // null once finished
  const std::string user;
  const bool events;
  detail::OutboundQueue out;
  Subscription subscription;  // an event stream's
  std::atomic<bool> counted{true};
  std::mutex logic_mutex;  // serializes the host's calls
  std::unique_ptr<detail::ConnectionLogic> logic;
  std::string frame;

  std::mutex state_mutex;  // what other threads touch
  std::vector<std::function<void()>> posted;
  std::optional<Close> close_requested;
  bool close_returned = false;
  bool finished = false;
};

ProtocolSession::ProtocolSession(std::shared_ptr<ProtocolHost> host, std::string user,
                                 std::optional<std::chrono::system_clock::time_point> token_expires,
                                 std::function<void()> wake) {
  if (!host) throw Exception(Error(errc::bad_request, "ProtocolSession needs a ProtocolHost"));
  if (user.empty()) throw Exception(Error(errc::bad_request, "ProtocolSession needs a user id"));
  impl_ = std::make_shared<impl>(host->impl_, user, std::move(wake), false);
  impl_->logic = std::make_unique<detail::ConnectionLogic>(
      impl_->host->ctx, std::static_pointer_cast<detail::ConnectionSink>(impl_), std::move(user),
      token_expires);
}

result<std::unique_ptr<ProtocolSession>> ProtocolSession::events(
    std::shared_ptr<ProtocolHost> host, std::string user, const std::string& topic,
    std::optional<std::string_view> last_event_id, std::string_view since, std::string_view epoch,
    std::function<void()> wake) {
  if (!host) return Error(errc::bad_request, "ProtocolSession needs a ProtocolHost");
  if (user.empty()) return Error(errc::bad_request, "ProtocolSession needs a user id");
  const auto& ctx = *host->impl_->ctx;
  if (!is_valid_topic(topic))
    return Error(errc::bad_request,
                 "give one valid ?topic= ('/'-separated segments of letters, digits and -_.:@+=~)");
  if (!ctx.may_subscribe(user, topic))
    return Error(errc::forbidden, fmt::format("you may not subscribe to '{}'", topic));
  auto resume = detail::parse_resume_point(last_event_id, since, epoch);
  if (!resume) return resume.error();
  std::unique_ptr<ProtocolSession> s(new ProtocolSession());
  s->impl_ = std::make_shared<impl>(host->impl_, std::move(user), std::move(wake), true);
  s->impl_->push(std::make_shared<const std::string>("retry: 2000\n"), nullptr);
  auto sub = detail::follow_for_events(ctx, topic, *resume,
                                       std::static_pointer_cast<detail::ConnectionSink>(s->impl_));
  if (!sub) return sub.error();
  s->impl_->subscription = std::move(*sub);
  host->impl_->metrics.subscriptions.fetch_add(1);
  return s;
}

ProtocolSession::~ProtocolSession() {
  if (!impl_) return;
  std::lock_guard lock(impl_->logic_mutex);
  impl_->finish();
  impl_->logic.reset();
}

void ProtocolSession::feed(std::string_view text, clock::time_point now) {
  std::lock_guard lock(impl_->logic_mutex);
  if (impl_->finished || impl_->out.closed() || !impl_->logic) return;
  const auto limit = impl_->host->ctx->options.max_message_bytes;
  if (text.size() > limit)
    return impl_->close(1009, fmt::format("message too big: {} bytes, at most {}", text.size(), limit));
  impl_->logic->on_message(text, now);
}

void ProtocolSession::feed_binary(clock::time_point now) {
  std::lock_guard lock(impl_->logic_mutex);
  if (impl_->finished || impl_->out.closed() || !impl_->logic) return;
  impl_->logic->on_binary(now);
}

ProtocolSession::Output ProtocolSession::poll(clock::time_point now, std::size_t max_frame) {
  auto& s = *impl_;
  std::lock_guard lock(s.logic_mutex);
  std::vector<std::function<void()>> posted;
  {
    std::lock_guard state(s.state_mutex);
    if (s.finished) return {};
    posted.swap(s.posted);
  }
  for (auto& fn : posted) fn();  // booking answers, in the order they came
  posted.clear();
  if (s.logic)
    if (auto when = s.logic->next_deadline(); when && *when <= now) s.logic->on_deadline(now);
  Output out;
  if (const auto n = s.out.take(s.frame, std::max<std::size_t>(max_frame, 1)); n > 0) {
    if (s.events) s.frame += '\n';  // the blank line that ends the last message
    s.host->metrics.frames_written.fetch_add(1, std::memory_order_relaxed);
    s.host->metrics.messages_pushed.fetch_add(n, std::memory_order_relaxed);
    s.host->metrics.bytes_pushed.fetch_add(s.frame.size(), std::memory_order_relaxed);
    out.text.swap(s.frame);
    return out;
  }
  if (s.frame.capacity() > std::string().capacity()) std::string().swap(s.frame);
  std::optional<Close> close;
  {
    std::lock_guard state(s.state_mutex);
    if (s.close_requested && !s.close_returned) {
      s.close_returned = true;
      close = s.close_requested;
    }
  }
  if (close) {
    out.close = std::move(close);
    s.finish();
  }
  return out;
}

std::optional<ProtocolSession::clock::time_point> ProtocolSession::next_deadline() const {
  std::lock_guard lock(impl_->logic_mutex);
  if (impl_->finished || !impl_->logic) return std::nullopt;
  return impl_->logic->next_deadline();
}

void ProtocolSession::close() {
  std::lock_guard lock(impl_->logic_mutex);
  impl_->finish();
}

bool ProtocolSession::closed() const {
  std::lock_guard lock(impl_->state_mutex);
  return impl_->finished || impl_->close_requested.has_value();
}

const std::string& ProtocolSession::user() const noexcept { return impl_->user; }

std::size_t ProtocolSession::subscriptions() const {
  std::lock_guard lock(impl_->logic_mutex);
  if (impl_->finished) return 0;
  return impl_->logic ? impl_->logic->subscriptions() : (impl_->subscription.active() ? 1 : 0);
}

}  // namespace pushbook
