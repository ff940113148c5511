// The protocol logic without sockets: a fake sink records what a connection would send.
#include "gateway/protocol.hpp"

#include "wait.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <atomic>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

using namespace pushbook;
using namespace pushbook::detail;
using namespace std::chrono_literals;

namespace {

struct FakeSink : ConnectionSink {
  std::mutex mutex;
  std::vector<boost::json::object> sent;
  std::vector<std::pair<std::uint16_t, std::string>> closes;
  void send_text(std::shared_ptr<const std::string> m) override {
    std::lock_guard lock(mutex);
    sent.push_back(boost::json::parse(*m).as_object());
  }
  void send_event(const EventPtr& e, bool snapshot) override {
    std::lock_guard lock(mutex);
    sent.push_back(boost::json::parse(*e->wire(snapshot)).as_object());
  }
  void close(std::uint16_t code, std::string reason) override {
    std::lock_guard lock(mutex);
    closes.emplace_back(code, std::move(reason));
  }
  void post(std::function<void()> fn) override { fn(); }  // the test's thread is the strand
  std::vector<boost::json::object> take() {
    std::lock_guard lock(mutex);
    return std::exchange(sent, {});
  }
};

// A LocalBus behind a gate the test works: publishes refused on demand (errc::bus_unavailable,
// as RedisBus while Redis is away; the engine keeps them and retries), a hook run before each
// subscribe (to make something happen between a book's ACK and the gateway's subscription to its
// topic), and renumber(): the bus loses everything, as a Redis restarted without its data, so
// every topic starts a new epoch.
class GateBus final : public EventBus {
 public:
  std::atomic<bool> refuse{false};
  std::function<void(std::string_view pattern)> before_subscribe;  // set before any subscribe

  void renumber() {
    std::lock_guard lock(mutex_);
    inner_ = std::make_shared<LocalBus>();
  }
  std::shared_ptr<LocalBus> inner() const {
    std::lock_guard lock(mutex_);
    return inner_;
  }

  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& options) override {
    if (refuse.load()) return Error(errc::bus_unavailable, "the bus is away (test)");
    return inner()->publish(topic, std::move(data), options);
  }
  result<Subscription> subscribe(std::string_view pattern, DeliveryCallback callback,
                                 SubscribeOptions options = {}) override {
    subscribes.fetch_add(1);
    if (before_subscribe) before_subscribe(pattern);
    return inner()->subscribe(pattern, std::move(callback), std::move(options));
  }
  EventPtr last(std::string_view topic) const override { return inner()->last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq = 0) const override {
    return inner()->history(topic, since_seq);
  }
  // Off by default (as RedisBus): the gateway then always follows a booking through a subscription.
  std::atomic<bool> local_history{false};
  std::atomic<int> subscribes{0};  // subscribe calls, for tests that show there was none
  std::optional<std::vector<EventPtr>> history_if_local(std::string_view topic,
                                                        std::uint64_t since_seq = 0) const override {
    if (!local_history.load()) return std::nullopt;
    return inner()->history_if_local(topic, since_seq);
  }

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<LocalBus> inner_ = std::make_shared<LocalBus>();
};

struct Fixture {
  GatewayMetrics metrics;
  std::shared_ptr<GatewayContext> ctx = std::make_shared<GatewayContext>();
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();
  std::shared_ptr<GateBus> bus = std::make_shared<GateBus>();
  explicit Fixture(GatewayOptions o = {}, EngineOptions eo = {}) {
    ctx->bus = bus;
    ctx->hub = std::make_shared<TopicHub>(ctx->bus);
    ctx->engine = std::make_shared<BookingEngine>(ctx->bus, std::move(eo));
    ctx->engine->add_resource("r", 5).value();
    o.secret = "s";
    ctx->options = o;
    ctx->keys->set(std::make_shared<const KeySet>(KeySet::from_secret(o.secret)));
    ctx->metrics = &metrics;
  }
  std::unique_ptr<ConnectionLogic> connect(
      const std::string& user, std::optional<std::chrono::system_clock::time_point> exp = std::nullopt,
      std::shared_ptr<FakeSink> to = nullptr) {
    return std::make_unique<ConnectionLogic>(ctx, to ? to : sink, user, exp);
  }
  // Waits until the bus has published `version` (or a later one) on `topic`.
  bool published(const std::string& topic, std::uint64_t version) {
    return test::eventually([&] {
      auto last = bus->last(topic);
      return last && last->seq() >= version;
    });
  }
};

// A MemoryStore whose commits complete when the test says (a durable store's completion thread
// running late): several books can then be in flight on one connection.
class HeldStore final : public BookingStore {
 public:
  void hold() {
    std::lock_guard lock(mutex_);
    holding_ = true;
  }
  // Completes the held commits, in order, on this thread, and stops holding.
  void release() {
    std::vector<std::pair<CommitCallback, result<void>>> held;
    {
      std::lock_guard lock(mutex_);
      holding_ = false;
      held.swap(held_);
    }
    for (auto& [done, r] : held) done(std::move(r));
  }

  result<void> commit(const StateChange& change) override { return inner_.commit(change); }
  void commit_async(const StateChange& change, CommitCallback done) override {
    auto r = inner_.commit(change);
    std::unique_lock lock(mutex_);
    if (holding_) return held_.emplace_back(std::move(done), std::move(r)), void();
    lock.unlock();
    done(std::move(r));
  }
  result<std::optional<Booking>> load(std::string_view id) const override { return inner_.load(id); }
  result<void> put_resource(std::string_view id, std::uint32_t capacity) override {
    return inner_.put_resource(id, capacity);
  }
  result<RecoveredState> recover(wall_clock::time_point since) override { return inner_.recover(since); }

 private:
  MemoryStore inner_;
  std::mutex mutex_;
  bool holding_ = false;
  std::vector<std::pair<CommitCallback, result<void>>> held_;
};

// An engine whose handler holds every booking's Completion until the test decides it.
struct Held {
  test::Collector<Completion> pending;
  EngineOptions options() {
    EngineOptions o;
    o.handler = [this](const Booking&, Completion done) { pending.push(std::move(done)); };
    return o;
  }
  // Decides the n-th booking handed to the handler (0-based), once it was.
  void decide(std::size_t n, Decision d) {
    auto all = pending.wait_for(n + 1);
    REQUIRE(all.size() > n);
    CHECK(all[n](std::move(d)));
  }
  void approve(std::size_t n) { decide(n, Decision::approved()); }
};

// The booking a book reply is about, and its topic.
std::string topic_of(const boost::json::object& reply) {
  return "booking/" + std::string(reply.at("result").at("booking_id").as_string());
}

// Waits until `sink` holds at least n messages; takes them.
std::vector<boost::json::object> take_at_least(FakeSink& sink, std::size_t n) {
  test::eventually([&] {
    std::lock_guard lock(sink.mutex);
    return sink.sent.size() >= n;
  });
  return sink.take();
}

// A ping's reply: what comes after it in the sink came after everything before it.
bool nothing_more(ConnectionLogic& c, FakeSink& sink) {
  c.on_message(R"({"id":999,"op":"ping"})");
  auto sent = sink.take();
  return sent.size() == 1 && sent[0].at("id") == 999;
}

// A connection of alice's that books with "follow":"decision" over a bus that holds its history
// in memory (as LocalBus), and what it was sent at once.
std::pair<std::unique_ptr<ConnectionLogic>, std::vector<boost::json::object>> book_until_decision(
    Fixture& f) {
  f.bus->local_history = true;
  auto c = f.connect("alice");
  c->on_message(R"({"id":1,"op":"book","resource":"r","follow":"decision"})");
  return {std::move(c), f.sink->take()};
}

}  // namespace

TEST_CASE("book: the ACK with the booking's seq, then exactly the decision (no second processing)") {
  Held held;  // decided by the test: after the subscription started, for sure
  Fixture f({}, held.options());
  auto c = f.connect("alice");
  c->on_message(R"({"id":7,"op":"book","resource":"r","quantity":2})");
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("type") == "reply");
  CHECK(sent[0].at("id") == 7);
  CHECK(sent[0].at("result").at("status") == "processing");
  CHECK(sent[0].at("result").at("seq") == 1);
  CHECK(!sent[0].at("result").as_object().contains("replayed"));
  const auto topic = topic_of(sent[0]);
  CHECK(c->subscriptions() == 1);
  CHECK(f.metrics.subscriptions.load() == 1);
  held.approve(0);
  sent = take_at_least(*f.sink, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("type") == "event");
  CHECK(sent[0].at("topic").as_string() == topic);
  CHECK(sent[0].at("seq") == 2);
  CHECK(!sent[0].contains("snapshot"));
  CHECK(sent[0].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*c, *f.sink));
  c.reset();
  CHECK(f.metrics.subscriptions.load() == 0);
}

TEST_CASE("book: a booking decided before the gateway subscribes to its topic: the decision, replayed") {
  Fixture f;  // no handler: decided at once, on a worker
  // Between the ACK and the subscription, the booking is decided and the decision published.
  f.bus->before_subscribe = [&](std::string_view topic) {
    if (topic.starts_with("booking/")) CHECK(f.published(std::string(topic), 2));
  };
  auto c = f.connect("alice");
  c->on_message(R"({"id":1,"op":"book","resource":"r"})");
  auto sent = take_at_least(*f.sink, 2);
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("status") == "processing");
  CHECK(sent[0].at("result").at("seq") == 1);
  CHECK(sent[1].at("topic").as_string() == topic_of(sent[0]));
  CHECK(sent[1].at("seq") == 2);
  CHECK(!sent[1].contains("snapshot"));  // from the topic's history, after the ACK's seq
  CHECK(sent[1].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE(
    "book with follow:decision, decided before its ACK: the decision from the bus's memory, no "
    "subscription") {
  // The engine decides on the submitting thread (no handler): when the ACK comes back the decision
  // is in LocalBus's history, and the gateway sends it from there.
  Fixture f;
  auto [c, sent] = book_until_decision(f);
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("status") == "processing");
  CHECK(sent[0].at("result").at("seq") == 1);
  const auto topic = topic_of(sent[0]);
  CHECK(sent[1].at("topic").as_string() == topic);
  CHECK(sent[1].at("seq") == 2);
  CHECK(!sent[1].contains("snapshot"));
  CHECK(sent[1].at("data").at("status") == "confirmed");
  CHECK(f.bus->subscribes.load() == 0);
  CHECK(c->subscriptions() == 0);
  CHECK(f.metrics.subscriptions.load() == 0);
  CHECK(nothing_more(*c, *f.sink));
  // A later change of the booking is not pushed: the client asked for the decision only.
  REQUIRE(f.ctx->engine->cancel(std::string(sent[0].at("result").at("booking_id").as_string())));
  CHECK(f.published(topic, 3));
  CHECK(nothing_more(*c, *f.sink));

  // "all" (the default) follows on: a subscription, even though the decision is in memory.
  c->on_message(R"({"id":2,"op":"book","resource":"r"})");
  sent = take_at_least(*f.sink, 2);
  REQUIRE(sent.size() == 2);
  CHECK(sent[1].at("data").at("status") == "confirmed");
  CHECK(f.bus->subscribes.load() == 1);
  CHECK(c->subscriptions() == 1);
}

TEST_CASE("book with follow:decision, not decided at its ACK: the subscription follows it, then ends") {
  Held held;
  Fixture f({}, held.options());
  auto [c, sent] = book_until_decision(f);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("result").at("status") == "processing");
  CHECK(f.bus->subscribes.load() == 1);  // the history holds only the processing state
  CHECK(c->subscriptions() == 1);
  held.approve(0);
  sent = take_at_least(*f.sink, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("seq") == 2);
  CHECK(sent[0].at("data").at("status") == "confirmed");
  // Ended on the connection's strand (the sink's post) right after the decision was sent.
  CHECK(test::eventually([&] { return f.metrics.subscriptions.load() == 0; }));
  CHECK(c->subscriptions() == 0);
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE("book: an idempotent retry's reply, then the state it reports, whole, once") {
  Held held;
  Fixture f({}, held.options());
  auto first = f.connect("alice");
  first->on_message(R"({"id":1,"op":"book","resource":"r","idempotency_key":"k1"})");
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 1);
  const auto topic = topic_of(sent[0]);

  // Retried while processing on the same connection, which follows the booking already: the
  // reply, and that subscription goes on (nothing is sent again).
  first->on_message(R"({"id":2,"op":"book","resource":"r","idempotency_key":"k1"})");
  sent = f.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("result").at("replayed") == true);
  CHECK(sent[0].at("result").at("status") == "processing");
  CHECK(sent[0].at("result").at("seq") == 1);
  CHECK(first->subscriptions() == 1);
  // On another connection (a reconnect whose first reply was lost): the reply, then the state it
  // reports as an event of the topic, then the decision.
  auto other_sink = std::make_shared<FakeSink>();
  auto second = f.connect("alice", std::nullopt, other_sink);
  second->on_message(R"({"id":3,"op":"book","resource":"r","idempotency_key":"k1"})");
  sent = other_sink->take();
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("replayed") == true);
  CHECK(sent[0].at("result").at("seq") == 1);
  CHECK(sent[1].at("topic").as_string() == topic);
  CHECK(sent[1].at("seq") == 1);
  CHECK(sent[1].at("data").at("status") == "processing");
  held.decide(0, Decision::approved());
  for (auto* sink : {f.sink.get(), other_sink.get()}) {
    sent = take_at_least(*sink, 1);
    REQUIRE(sent.size() == 1);
    CHECK(sent[0].at("topic").as_string() == topic);
    CHECK(sent[0].at("seq") == 2);
    CHECK(sent[0].at("data").at("status") == "confirmed");
  }
  CHECK(nothing_more(*first, *f.sink));
  CHECK(nothing_more(*second, *other_sink));

  // Retried after the decision: the reply says it (seq 2), the decision follows once, whole,
  // and the connection follows the booking for what comes next.
  auto third_sink = std::make_shared<FakeSink>();
  auto third = f.connect("alice", std::nullopt, third_sink);
  third->on_message(R"({"id":4,"op":"book","resource":"r","idempotency_key":"k1"})");
  sent = third_sink->take();
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("replayed") == true);
  CHECK(sent[0].at("result").at("status") == "confirmed");
  CHECK(sent[0].at("result").at("seq") == 2);
  CHECK(sent[1].at("seq") == 2);
  CHECK(sent[1].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*third, *third_sink));
  CHECK(third->subscriptions() == 1);
  third->on_message(fmt::format(R"({{"id":5,"op":"cancel","booking_id":"{}"}})", topic.substr(8)));
  sent = take_at_least(*third_sink, 2);
  REQUIRE(sent.size() == 2);
  // The cancel's event (seq 3) and its reply, in either order.
  const auto& event = sent[0].at("type") == "event" ? sent[0] : sent[1];
  CHECK(event.at("seq") == 3);
  CHECK(event.at("data").at("status") == "cancelled");

  // A rejected booking retried: what the reply cannot say (the reason) comes with the state.
  third->on_message(R"({"id":6,"op":"book","resource":"r","idempotency_key":"k2"})");
  CHECK(third_sink->take().size() == 1);
  held.decide(1, Decision::declined("no"));
  CHECK(take_at_least(*third_sink, 1).size() == 1);
  auto fourth_sink = std::make_shared<FakeSink>();
  auto fourth = f.connect("alice", std::nullopt, fourth_sink);
  fourth->on_message(R"({"id":7,"op":"book","resource":"r","idempotency_key":"k2"})");
  sent = fourth_sink->take();
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("status") == "rejected");
  CHECK(sent[0].at("result").at("seq") == 2);
  CHECK(sent[1].at("seq") == 2);
  CHECK(sent[1].at("data").at("reason") == "rejected_by_handler");
  CHECK(sent[1].at("data").at("reason_message") == "no");
  CHECK(nothing_more(*fourth, *fourth_sink));
}

TEST_CASE("book while the bus refuses the ACK's publish: the decision once it is relayed, nothing before") {
  Held held;
  Fixture f({}, held.options());
  f.bus->refuse = true;  // the processing version's publish fails: the engine retries it later
  auto c = f.connect("alice");
  c->on_message(R"({"id":1,"op":"book","resource":"r"})");
  auto sent = f.sink->take();
  // The ACK only: the topic has nothing on the bus, so the bus gives the booking's stored state as
  // a snapshot, which is the processing version the ACK just said.
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("result").at("seq") == 1);
  const auto topic = topic_of(sent[0]);
  held.approve(0);  // decided while the bus still refuses: queued behind the processing version
  CHECK(test::eventually([&] { return f.ctx->engine->get(topic.substr(8))->version == 2; }));
  f.bus->refuse = false;
  CHECK(f.published(topic, 2));  // the engine relays version 1, then 2
  sent = take_at_least(*f.sink, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("seq") == 2);
  CHECK(sent[0].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE("book, decided while the bus refuses, then subscribed: the decision once, when the bus has it") {
  Fixture f;  // decided at once
  f.bus->refuse = true;
  f.bus->before_subscribe = [&](std::string_view topic) {
    if (!topic.starts_with("booking/")) return;
    // Decided (in the store and in memory), but nothing of it on the bus yet.
    const auto id = std::string(topic.substr(8));
    CHECK(test::eventually([&] { return f.ctx->engine->get(id)->status == BookingStatus::confirmed; }));
  };
  auto c = f.connect("alice");
  c->on_message(R"({"id":1,"op":"book","resource":"r"})");
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("result").at("status") == "processing");
  const auto topic = topic_of(sent[0]);
  // No snapshot from the store: the engine still has the booking's events to publish
  // (BookingEngine::publishing), and a store state ahead of them would come before them.
  CHECK(f.ctx->engine->publishing(topic.substr(8)));
  f.bus->refuse = false;
  CHECK(f.published(topic, 2));  // versions 1 and 2 retried: 1 is what the reply said
  auto more = take_at_least(*f.sink, 1);
  REQUIRE(more.size() == 1);
  CHECK(more[0].at("seq") == 2);
  CHECK(!more[0].contains("snapshot"));
  CHECK(more[0].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE("book, then the bus's numbering restarts before the subscription: still the decision") {
  Held held;
  Fixture f({}, held.options());
  std::uint32_t acked_epoch = 0;
  bool renumbered = false;
  f.bus->before_subscribe = [&](std::string_view pattern) {
    // Once: the gateway's hub may subscribe again for this connection (its own first subscription
    // got a snapshot: the new numbering's history starts at 2).
    if (!pattern.starts_with("booking/") || std::exchange(renumbered, true)) return;
    const std::string topic(pattern);
    acked_epoch = f.bus->last(topic)->epoch();
    f.bus->renumber();  // the bus lost everything (a Redis restarted without its data)
    held.approve(0);    // the decision goes out in the topic's new numbering, as seq 2
    CHECK(f.published(topic, 2));
  };
  auto c = f.connect("alice");
  c->on_message(R"({"id":1,"op":"book","resource":"r"})");
  auto sent = take_at_least(*f.sink, 2);
  REQUIRE(sent.size() == 2);
  CHECK(sent[0].at("result").at("seq") == 1);
  CHECK(sent[1].at("seq") == 2);
  CHECK(!sent[1].contains("snapshot"));
  CHECK(sent[1].at("data").at("status") == "confirmed");
  CHECK(sent[1].at("epoch").as_string() != format_epoch(acked_epoch));
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE("book at the subscription cap: the ACK, a notice; then since = its seq: the decision") {
  Held held;
  GatewayOptions o;
  o.max_subscriptions = 1;
  auto store = std::make_shared<HeldStore>();
  auto eo = held.options();
  eo.store = store;
  Fixture f(o, std::move(eo));
  auto c = f.connect("alice");
  // Two books in flight at once, each within the cap when sent (no subscription yet); the store
  // answers both afterwards.
  store->hold();
  c->on_message(R"({"id":1,"op":"book","resource":"r"})");
  c->on_message(R"({"id":2,"op":"book","resource":"r"})");
  CHECK(f.sink->take().empty());
  store->release();
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 3);
  CHECK(sent[0].at("id") == 1);
  const auto first = topic_of(sent[0]);
  CHECK(sent[1].at("id") == 2);
  CHECK(sent[1].at("result").at("seq") == 1);
  const auto second = topic_of(sent[1]);
  CHECK(sent[2].at("type") == "notice");
  CHECK(sent[2].at("code") == "subscription_ended");
  CHECK(sent[2].at("topic").as_string() == second);
  CHECK(c->subscriptions() == 1);
  // The client makes room and follows the second booking from the ACK's seq.
  c->on_message(fmt::format(R"({{"id":3,"op":"unsubscribe","topic":"{}"}})", first));
  c->on_message(fmt::format(R"({{"id":4,"op":"subscribe","topic":"{}","since":1}})", second));
  sent = f.sink->take();
  REQUIRE(sent.size() == 2);
  CHECK(sent[1].at("result").at("topic").as_string() == second);
  held.approve(0);
  held.approve(1);
  sent = take_at_least(*f.sink, 1);
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("topic").as_string() == second);
  CHECK(sent[0].at("seq") == 2);
  CHECK(sent[0].at("data").at("status") == "confirmed");
  CHECK(nothing_more(*c, *f.sink));
}

TEST_CASE("replies to malformed requests carry stable codes and the id when there is one") {
  Fixture f;
  auto c = f.connect("alice");
  c->on_message("{");
  c->on_message(R"({"id":"x","op":"ping"})");
  c->on_message(R"({"id":3})");
  c->on_message(R"({"id":4,"op":"subscribe","topic":"booking/*"})");
  c->on_message(R"({"id":5,"op":"cancel","booking_id":"nope"})");
  c->on_message(R"({"id":6,"op":"unsubscribe","topic":"user/alice"})");
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 6);
  CHECK(sent[0].at("id").is_null());
  CHECK(sent[0].at("error").at("code") == "bad_request");
  CHECK(sent[1].at("error").at("message") == "\"id\" must be an integer");
  CHECK(sent[2].at("id") == 3);
  CHECK(sent[2].at("error").at("message") == "every request needs a string \"op\"");
  CHECK(sent[3].at("error").at("code") == "bad_request");
  CHECK(sent[4].at("error").at("code") == "not_found");
  CHECK(sent[5].at("error").at("message") == "not subscribed to 'user/alice'");
  CHECK(f.metrics.client_errors.load() == 6);
}

TEST_CASE("the token bucket refuses, then closes with 1008 when the client keeps going") {
  GatewayOptions o;
  o.rate_limit_per_second = 1;
  o.rate_limit_burst = 3;
  Fixture f(o);
  auto c = f.connect("alice");
  const auto t0 = steady::now();
  for (int i = 0; i < 3; ++i) c->on_message(R"({"id":1,"op":"ping"})", t0);
  c->on_message(R"({"id":2,"op":"ping"})", t0);
  auto sent = f.sink->take();
  REQUIRE(sent.size() == 4);
  CHECK(sent[2].at("ok") == true);
  CHECK(sent[3].at("error").at("code") == "rate_limited");
  c->on_message(R"({"id":3,"op":"ping"})", t0 + 1100ms);  // one token refilled
  CHECK(f.sink->take().at(0).at("ok") == true);
  for (int i = 0; i < 4; ++i) c->on_message(R"({"id":4,"op":"ping"})", t0 + 1100ms);
  CHECK(f.sink->closes == std::vector<std::pair<std::uint16_t, std::string>>{{1008, "rate limit exceeded"}});
}

TEST_CASE("token expiry: a notice, then 4001 after the grace period unless refreshed") {
  GatewayOptions o;
  o.token_refresh_grace = 30s;
  Fixture f(o);
  auto c = f.connect("alice", std::chrono::system_clock::now() + 10s);
  REQUIRE(c->next_deadline().has_value());
  const auto at = *c->next_deadline();
  c->on_deadline(at - 1s);  // too early: nothing
  CHECK(f.sink->take().empty());
  c->on_deadline(at);
  auto notice = f.sink->take();
  REQUIRE(notice.size() == 1);
  CHECK(notice[0].at("code") == "token_expired");
  CHECK(*c->next_deadline() == at + 30s);
  c->on_deadline(at + 30s);
  CHECK(f.sink->closes == std::vector<std::pair<std::uint16_t, std::string>>{{4001, "token expired"}});
  CHECK_FALSE(c->next_deadline().has_value());

  auto no_expiry = f.connect("bob");
  CHECK_FALSE(no_expiry->next_deadline().has_value());
}

TEST_CASE("a sustained flood is closed with 1008 though refills let a message through now and then") {
  // 100 messages/s against 10/s with a burst of 20: each refill lets one through, and the nine
  // refused in between must not be forgiven by it (hardening finding 3).
  GatewayOptions o;
  o.rate_limit_per_second = 10;
  o.rate_limit_burst = 20;
  for (bool binary : {false, true}) {
    CAPTURE(binary);
    Fixture f(o);
    auto c = f.connect("alice");
    const auto t0 = steady::now();
    int sent = 0;
    for (; sent < 300 && f.sink->closes.empty(); ++sent) {  // 3 s of flood at most
      const auto at = t0 + std::chrono::milliseconds(10 * sent);
      if (binary)
        c->on_binary(at);
      else
        c->on_message(R"({"id":1,"op":"ping"})", at);
    }
    CHECK(f.sink->closes ==
          std::vector<std::pair<std::uint16_t, std::string>>{{1008, "rate limit exceeded"}});
    CHECK(sent < 100);  // within the first second
  }
  // A client that stays within the rate is never closed, whatever it did before.
  Fixture f(o);
  auto c = f.connect("alice");
  const auto t0 = steady::now();
  for (int i = 0; i < 25; ++i) c->on_message(R"({"id":1,"op":"ping"})", t0);  // 5 refused
  for (int i = 1; i <= 100; ++i)
    c->on_message(R"({"id":1,"op":"ping"})", t0 + std::chrono::milliseconds(100 * i));
  CHECK(f.sink->closes.empty());
}

TEST_CASE("refresh verifies the new token and moves the deadline") {
  Fixture f;
  auto c = f.connect("alice", std::chrono::system_clock::now() + 10s);
  const auto before = *c->next_deadline();
  c->on_message(R"({"id":1,"op":"refresh","token":")" +
                sign_token("alice", std::chrono::system_clock::now() + 1h, "s") + R"("})");
  auto r = f.sink->take().at(0);
  CHECK(r.at("ok") == true);
  CHECK(*c->next_deadline() > before + 3000s);
  c->on_message(R"({"id":2,"op":"refresh","token":"garbage"})");
  CHECK(f.sink->take().at(0).at("error").at("code") == "unauthorized");
  // A far-future exp (year 2255; auth_test covers the ones system_clock cannot hold): the reply
  // says when, and no deadline is armed that could overflow.
  const auto far = std::chrono::system_clock::time_point(std::chrono::seconds(9'000'000'000));
  c->on_message(R"({"id":3,"op":"refresh","token":")" + sign_token("alice", far, "s") + R"("})");
  auto far_reply = f.sink->take().at(0);
  CHECK(far_reply.at("result").at("expires_at").as_int64() == 9'000'000'000'000);
  CHECK_FALSE(c->next_deadline().has_value());
}

TEST_CASE("wire error mapping") {
  CHECK(std::string(wire_error(make_error_code(errc::sold_out)).code) == "sold_out");
  CHECK(wire_error(make_error_code(errc::idempotency_conflict)).http_status == 422);
  CHECK(wire_error(make_error_code(errc::overloaded)).http_status == 503);
  CHECK(std::string(wire_error(make_error_code(errc::bus_unavailable)).code) == "overloaded");
  CHECK(wire_error(make_error_code(errc::bus_unavailable)).http_status == 503);
  CHECK(std::string(wire_error(make_error_code(errc::store_failed)).code) == "overloaded");
  CHECK(wire_error(make_error_code(errc::store_failed)).http_status == 503);
  CHECK(std::string(wire_error(make_error_code(errc::invalid_transition)).code) == "bad_request");
  CHECK(wire_error(std::make_error_code(std::errc::io_error)).http_status == 500);
  CHECK(http_error_body("not_found", "no booking 'x'") ==
        R"({"error":{"code":"not_found","message":"no booking 'x'"}})");
  CHECK(reply_ok(1, {{"a", 1}}) == R"({"type":"reply","id":1,"ok":true,"result":{"a":1}})");
}

TEST_CASE("replies written out are what serializing the same object gives") {
  // reply_ok and the book ACK write their JSON out instead of serializing an object made for it.
  const auto reply = [](const boost::json::value& id, const boost::json::object& result) {
    return boost::json::serialize(
        boost::json::object{{"type", "reply"}, {"id", id}, {"ok", true}, {"result", result}});
  };
  for (const boost::json::value& id :
       {boost::json::value(7), boost::json::value(-3), boost::json::value(std::uint64_t{1} << 63),
        boost::json::value("text id"), boost::json::value(nullptr)}) {
    CAPTURE(boost::json::serialize(id));
    const boost::json::object result{{"booking_id", "b-1"}, {"status", "processing"}, {"seq", 1}};
    CHECK(reply_ok(id, result) == reply(id, result));
    for (const auto& ack :
         {Ack{"b-1", BookingStatus::processing, false, 1}, Ack{"q\"u\\o", BookingStatus::confirmed, true, 2},
          Ack{"01HZX", BookingStatus::rejected, true, std::numeric_limits<std::uint64_t>::max()}}) {
      boost::json::object expected{
          {"booking_id", ack.booking_id}, {"status", to_string(ack.status)}, {"seq", ack.version}};
      if (ack.replayed) expected["replayed"] = true;
      CHECK(reply_booked(id, ack) == reply(id, expected));
    }
  }
  // Strings are escaped as boost::json::serialize escapes them, byte for byte.
  for (const std::string_view s : {std::string_view("plain"), std::string_view("q\"u\\o\nte\t\x01\x1f"),
                                   std::string_view("caf\xc3\xa9 / \xe2\x82\xac"), std::string_view()}) {
    std::string out;
    append_json_string(out, s);
    CHECK(out == boost::json::serialize(boost::json::string(s)));
  }
  std::string ascii;
  for (int c = 1; c < 128; ++c) ascii += static_cast<char>(c);
  std::string out;
  append_json_string(out, ascii);
  CHECK(out == boost::json::serialize(boost::json::string(ascii)));
}

// --- ConnectionLogic without an engine or a bus: a fake backend (ProtocolBackend) ----------------

namespace {

struct FakeSubscription : detail::SubscriptionState {
  std::atomic<bool> live{true};
  void cancel() noexcept override { live = false; }
  bool active() const noexcept override { return live; }
};

// Records what the protocol asks of the engine and the bus; the test answers.
struct FakeBackend : ProtocolBackend {
  std::vector<std::pair<BookingRequest, std::function<void(result<Ack>)>>> submitted;
  std::map<std::string, Booking, std::less<>> bookings;
  struct Follow {
    std::string topic;
    std::optional<std::uint64_t> since;
    DeliveryCallback deliver;
    std::shared_ptr<FakeSubscription> state;
  };
  std::vector<Follow> follows;
  std::vector<std::string> cancelled;

  void submit_async(BookingRequest request, std::function<void(result<Ack>)> done) override {
    submitted.emplace_back(std::move(request), std::move(done));
  }
  result<Booking> get(std::string_view id) override {
    auto it = bookings.find(id);
    if (it == bookings.end()) return Error(errc::not_found, "no such booking");
    return it->second;
  }
  result<Booking> cancel(std::string_view id) override {
    cancelled.emplace_back(id);
    auto b = get(id);
    if (b) b->status = BookingStatus::cancelled;
    return b;
  }
  result<Subscription> follow(const std::string& topic, DeliveryCallback callback,
                              SubscribeOptions so) override {
    auto state = std::make_shared<FakeSubscription>();
    follows.push_back({topic, so.since_seq, std::move(callback), state});
    return Subscription(state);
  }
};

EventPtr booking_event(const std::string& id, std::uint64_t version, std::string_view status) {
  return std::make_shared<Event>("booking/" + id, version, std::chrono::system_clock::now(),
                                 std::make_shared<const boost::json::value>(boost::json::object{
                                     {"booking_id", id}, {"version", version}, {"status", status}}));
}

struct NoEngine {
  GatewayMetrics metrics;
  std::shared_ptr<FakeBackend> backend = std::make_shared<FakeBackend>();
  std::shared_ptr<GatewayContext> ctx = std::make_shared<GatewayContext>();
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();
  NoEngine() {
    ctx->backend = backend;  // no engine, no bus, no hub
    ctx->metrics = &metrics;
    ctx->options.secret = "s";
  }
};

}  // namespace

TEST_CASE("without an engine: book is submitted, answered later, then followed from the ACK's version") {
  NoEngine t;
  ConnectionLogic logic(t.ctx, t.sink, "alice", std::nullopt);
  logic.on_message(R"({"id":7,"op":"book","resource":"hall","quantity":2})");
  REQUIRE(t.backend->submitted.size() == 1);
  CHECK(t.backend->submitted[0].first.user == "alice");
  CHECK(t.backend->submitted[0].first.lines.at(0).resource == "hall");
  CHECK(t.sink->take().empty());  // nothing until the engine answers
  t.backend->submitted[0].second(Ack{"b1", BookingStatus::processing, false, 1});
  auto sent = t.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("id") == 7);
  CHECK(sent[0].at("result").as_object().at("seq") == 1);
  REQUIRE(t.backend->follows.size() == 1);
  CHECK(t.backend->follows[0].topic == "booking/b1");
  CHECK(t.backend->follows[0].since == 1);
  // The bus's deliveries: the ACK's version again (a snapshot) is not sent; the decision is.
  auto& deliver = t.backend->follows[0].deliver;
  deliver(Delivery{Delivery::Kind::snapshot, booking_event("b1", 1, "processing"), 0, {}});
  deliver(Delivery{Delivery::Kind::event, booking_event("b1", 2, "confirmed"), 0, {}});
  sent = t.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("seq") == 2);
  CHECK(sent[0].at("data").as_object().at("status") == "confirmed");
  CHECK(logic.subscriptions() == 1);
}

TEST_CASE(
    "without an engine: a refused book, cancel of one's own booking only, unsubscribe ends the follow") {
  NoEngine t;
  ConnectionLogic logic(t.ctx, t.sink, "alice", std::nullopt);
  logic.on_message(R"({"id":1,"op":"book","resource":"hall"})");
  t.backend->submitted.at(0).second(Error(errc::sold_out, "sold out"));
  auto sent = t.sink->take();
  REQUIRE(sent.size() == 1);
  CHECK(sent[0].at("error").as_object().at("code") == "sold_out");
  CHECK(t.backend->follows.empty());

  Booking mine;
  mine.id = "m1";
  mine.user = "alice";
  mine.status = BookingStatus::confirmed;
  Booking theirs = mine;
  theirs.id = "t1";
  theirs.user = "bob";
  t.backend->bookings = {{"m1", mine}, {"t1", theirs}};
  logic.on_message(R"({"id":2,"op":"cancel","booking_id":"t1"})");
  logic.on_message(R"({"id":3,"op":"cancel","booking_id":"m1"})");
  logic.on_message(R"({"id":4,"op":"subscribe","topic":"booking/t1"})");  // bob's: refused
  logic.on_message(R"({"id":5,"op":"subscribe","topic":"booking/m1"})");
  logic.on_message(R"({"id":6,"op":"unsubscribe","topic":"booking/m1"})");
  sent = t.sink->take();
  REQUIRE(sent.size() == 5);
  CHECK(sent[0].at("error").as_object().at("code") == "forbidden");
  CHECK(sent[1].at("result").as_object().at("status") == "cancelled");
  CHECK(t.backend->cancelled == std::vector<std::string>{"m1"});
  CHECK(sent[2].at("error").as_object().at("code") == "forbidden");
  CHECK(sent[3].at("ok") == true);
  CHECK(sent[4].at("ok") == true);
  REQUIRE(t.backend->follows.size() == 1);
  CHECK_FALSE(t.backend->follows[0].state->active());  // unsubscribed: the follow was cancelled
}
