// The protocol logic without sockets: a fake sink records what a connection would send.
#include "gateway/protocol.hpp"

#include "wait.hpp"

#include <doctest/doctest.h>
#include <boost/json/parse.hpp>

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

struct Fixture {
  GatewayMetrics metrics;
  std::shared_ptr<GatewayContext> ctx = std::make_shared<GatewayContext>();
  std::shared_ptr<FakeSink> sink = std::make_shared<FakeSink>();
  explicit Fixture(GatewayOptions o = {}) {
    ctx->bus = std::make_shared<LocalBus>();
    ctx->hub = std::make_shared<TopicHub>(ctx->bus);
    ctx->engine = std::make_shared<BookingEngine>(ctx->bus);
    ctx->engine->add_resource("r", 5).value();
    o.secret = "s";
    ctx->options = o;
    ctx->keys->set(std::make_shared<const KeySet>(KeySet::from_secret(o.secret)));
    ctx->metrics = &metrics;
  }
  std::unique_ptr<ConnectionLogic> connect(
      const std::string& user, std::optional<std::chrono::system_clock::time_point> exp = std::nullopt) {
    return std::make_unique<ConnectionLogic>(ctx, sink, user, exp);
  }
};

}  // namespace

TEST_CASE("book: the ACK first, then the booking's state from its topic") {
  Fixture f;
  auto c = f.connect("alice");
  c->on_message(R"({"id":7,"op":"book","resource":"r","quantity":2})");
  REQUIRE(test::eventually([&] { return f.ctx->engine->stats().in_flight == 0; }));
  auto sent = f.sink->take();
  REQUIRE(sent.size() >= 2);
  CHECK(sent[0].at("type") == "reply");
  CHECK(sent[0].at("id") == 7);
  CHECK(sent[0].at("result").at("status") == "processing");
  const auto id = sent[0].at("result").at("booking_id").as_string();
  CHECK(sent[1].at("topic").as_string() == "booking/" + std::string(id));
  CHECK(sent[1].at("snapshot") == true);
  CHECK(sent.back().at("data").at("status") == "confirmed");
  CHECK(c->subscriptions() == 1);
  CHECK(f.metrics.subscriptions.load() == 1);
  c.reset();
  CHECK(f.metrics.subscriptions.load() == 0);
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
  CHECK(std::string(wire_error(make_error_code(errc::invalid_transition)).code) == "bad_request");
  CHECK(wire_error(std::make_error_code(std::errc::io_error)).http_status == 500);
  CHECK(http_error_body("not_found", "no booking 'x'") ==
        R"({"error":{"code":"not_found","message":"no booking 'x'"}})");
  CHECK(reply_ok(1, {{"a", 1}}) == R"({"type":"reply","id":1,"ok":true,"result":{"a":1}})");
}
