// ProtocolSession (the protocol for a host's own WebSocket) and OutboundQueue (the bounded send
// queue it shares with the Beast session): driven as a host would, without any socket.
#include <pushbook/booking_engine.hpp>
#include <pushbook/event_bus.hpp>
#include <pushbook/protocol_session.hpp>

#include "gateway/outbound_queue.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <atomic>
#include <string>
#include <utility>
#include <vector>

using namespace pushbook;
using namespace std::chrono_literals;
using pushbook::test::eventually;

namespace {

struct Host {
  std::shared_ptr<LocalBus> bus = std::make_shared<LocalBus>();
  std::shared_ptr<BookingEngine> engine;
  std::shared_ptr<ProtocolHost> host;
  explicit Host(GatewayOptions o = {}) {
    EngineOptions eo;
    eo.workers = 1;
    engine = std::make_shared<BookingEngine>(bus, eo);
    engine->add_resource("hall", 2).value();
    host = ProtocolHost::create(engine, bus, std::move(o)).value();
  }
  ~Host() { engine->shutdown(); }
};

// A host's writer: counts wakes, collects every message poll() gives (split at newlines).
struct Client {
  std::atomic<int> wakes{0};
  ProtocolSession session;
  std::vector<boost::json::object> got;
  std::optional<ProtocolSession::Close> closed;
  Client(Host& h, std::string user, std::optional<std::chrono::system_clock::time_point> exp = std::nullopt)
      : session(h.host, std::move(user), exp, [this] { wakes.fetch_add(1); }) {}
  // Polls until nothing is left; returns the number of messages taken.
  std::size_t drain(ProtocolSession::clock::time_point now = ProtocolSession::clock::now()) {
    std::size_t n = 0;
    for (auto out = session.poll(now); !out.empty(); out = session.poll(now)) {
      std::string_view text = out.text;
      while (!text.empty()) {
        const auto nl = text.find('\n');
        got.push_back(boost::json::parse(text.substr(0, nl)).as_object());
        ++n;
        text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
      }
      if (out.close) closed = out.close;
    }
    return n;
  }
  // Drains until `pred` holds for a message received (or 10 s pass).
  bool until(const std::function<bool(const boost::json::object&)>& pred) {
    return eventually([&] {
      drain();
      for (const auto& m : got)
        if (pred(m)) return true;
      return false;
    });
  }
};

bool is_decision(const boost::json::object& m) {
  return m.at("type") == "event" && m.at("data").as_object().at("status") != "processing";
}

}  // namespace

TEST_CASE("ProtocolSession: book, the ACK, then the decision pushed, each woken and polled") {
  Host h;
  Client c(h, "alice");
  c.session.feed(R"({"id":1,"op":"book","resource":"hall"})");
  REQUIRE(c.until(is_decision));
  CHECK(c.wakes.load() >= 1);
  REQUIRE(c.got.size() == 2);  // the ACK, then the decision: never "processing" a second time
  CHECK(c.got[0].at("type") == "reply");
  CHECK(c.got[0].at("id") == 1);
  CHECK(c.got[0].at("result").as_object().at("status") == "processing");
  CHECK(c.got[1].at("seq") == 2);
  CHECK(c.got[1].at("data").as_object().at("status") == "confirmed");
  CHECK(c.session.subscriptions() == 1);
  CHECK(h.host->sessions() == 1);
  CHECK(h.host->metrics_text().find("pushbook_connections{kind=\"websocket\"} 1") != std::string::npos);
}

TEST_CASE("ProtocolSession: bad input is answered and the session goes on") {
  Host h;
  Client c(h, "alice");
  c.session.feed("{not json");
  c.session.feed_binary();
  c.session.feed(R"({"id":2,"op":"subscribe","topic":"user/bob"})");
  c.session.feed(R"({"id":3,"op":"ping"})");
  REQUIRE(c.drain() == 4);
  CHECK(c.got[0].at("error").as_object().at("code") == "bad_request");
  CHECK(c.got[1].at("error").as_object().at("code") == "bad_request");
  CHECK(c.got[2].at("error").as_object().at("code") == "forbidden");
  CHECK(c.got[3].at("ok") == true);
  CHECK_FALSE(c.closed);
}

TEST_CASE("ProtocolSession: a message over max_message_bytes closes with 1009 after what was queued") {
  GatewayOptions o;
  o.max_message_bytes = 100;
  Host h(o);
  Client c(h, "alice");
  c.session.feed(R"({"id":1,"op":"ping"})");
  c.session.feed(std::string(101, 'x'));
  c.session.feed(R"({"id":2,"op":"ping"})");  // after the close: ignored
  CHECK(c.drain() == 1);
  REQUIRE(c.closed);
  CHECK(c.closed->code == 1009);
  CHECK(c.session.closed());
  CHECK(c.session.poll().empty());
}

TEST_CASE("ProtocolSession: a client that does not read is closed with 1013, or gets a gap, per policy") {
  for (auto policy : {SlowConsumerPolicy::disconnect, SlowConsumerPolicy::drop_with_gap}) {
    CAPTURE(static_cast<int>(policy));
    GatewayOptions o;
    o.max_queued_bytes = 2000;
    o.slow_consumer = policy;
    Host h(o);
    Client c(h, "alice");
    c.session.feed(R"({"id":1,"op":"subscribe","topic":"resource/hall"})");
    c.drain();
    for (int i = 0; i < 100; ++i) h.bus->publish("resource/hall", boost::json::object{{"n", i}}).value();
    c.drain();
    if (policy == SlowConsumerPolicy::disconnect) {
      REQUIRE(c.closed);
      CHECK(c.closed->code == 1013);
      CHECK(c.closed->reason.starts_with("too slow"));
    } else {
      CHECK_FALSE(c.closed);
      bool gap = false;
      for (const auto& m : c.got) gap = gap || m.at("type") == "gap";
      CHECK(gap);
      CHECK(c.got.back().at("data").as_object().at("n") == 99);  // the newest kept
    }
  }
}

TEST_CASE("ProtocolSession: an expired token gets a notice, then 4001 after the grace") {
  GatewayOptions o;
  o.token_refresh_grace = 1000ms;
  Host h(o);
  Client c(h, "alice", std::chrono::system_clock::now() + 1h);
  const auto deadline = c.session.next_deadline();
  REQUIRE(deadline);
  c.drain(*deadline - 1s);
  CHECK(c.got.empty());
  c.drain(*deadline);
  REQUIRE(c.got.size() == 1);
  CHECK(c.got[0].at("code") == "token_expired");
  CHECK_FALSE(c.closed);
  c.drain(*deadline + 1001ms);
  REQUIRE(c.closed);
  CHECK(c.closed->code == 4001);
}

TEST_CASE("ProtocolSession: close() ends the subscriptions; the session and host refuse bad construction") {
  Host h;
  {
    Client c(h, "alice");
    c.session.feed(R"({"id":1,"op":"subscribe","topic":"resource/hall"})");
    c.drain();
    CHECK(c.session.subscriptions() == 1);
    c.session.close();
    c.session.close();  // idempotent
    CHECK(c.session.subscriptions() == 0);
    h.bus->publish("resource/hall", boost::json::object{{"n", 1}}).value();
    CHECK(c.session.poll().empty());
  }
  CHECK(h.host->sessions() == 0);
  CHECK_THROWS_AS(ProtocolSession(h.host, "", std::nullopt, {}), Exception);
  CHECK_THROWS_AS(ProtocolSession(nullptr, "alice", std::nullopt, {}), Exception);
  CHECK(ProtocolHost::create(nullptr, h.bus).error().is(errc::bad_request));
  GatewayOptions bad;
  bad.max_queued_bytes = 0;
  CHECK(ProtocolHost::create(h.engine, h.bus, bad).error().is(errc::bad_request));
}

TEST_CASE("ProtocolSession: drain() refuses new bookings") {
  Host h;
  Client c(h, "alice");
  h.host->drain();
  c.session.feed(R"({"id":1,"op":"book","resource":"hall"})");
  REQUIRE(c.drain() == 1);
  CHECK(c.got[0].at("error").as_object().at("code") == "overloaded");
}

TEST_CASE("OutboundQueue: one wake per idle period, frames bounded, replies never dropped") {
  detail::OutboundQueue q(100, SlowConsumerPolicy::drop_with_gap, nullptr);
  auto msg = [](std::string s) { return std::make_shared<const std::string>(std::move(s)); };
  CHECK(q.push(msg("a")).wake);
  CHECK_FALSE(q.push(msg("b")).wake);  // the writer is already woken
  std::string frame;
  CHECK(q.take(frame, 1) == 1);  // at least one message, even past max_frame
  CHECK(frame == "a");
  CHECK(q.take(frame, 100) == 1);
  CHECK(frame == "b");
  CHECK(q.take(frame, 100) == 0);  // idle again
  CHECK(q.empty());
  CHECK(q.push(msg("c")).wake);
  // A reply that does not fit is kept when nothing droppable is left: the policy's close.
  auto r = q.push(msg(std::string(200, 'x')));
  CHECK(r.too_slow);
  CHECK(q.closed());
  CHECK_FALSE(q.push(msg("d")).wake);  // closed: nothing more
}

TEST_CASE("ProtocolSession::events: an SSE stream of a topic, resumed from Last-Event-ID") {
  Host h;
  std::atomic<int> wakes{0};
  auto wake = [&] { wakes.fetch_add(1); };
  auto stream = ProtocolSession::events(h.host, "alice", "user/alice", std::nullopt, "", "", wake);
  REQUIRE(stream);
  CHECK((*stream)->poll().text == "retry: 2000\n\n");
  Client c(h, "alice");
  c.session.feed(R"({"id":1,"op":"book","resource":"hall"})");
  REQUIRE(c.until(is_decision));
  std::string text;
  REQUIRE(eventually([&] {
    text += (*stream)->poll().text;
    return text.find("confirmed") != std::string::npos;
  }));
  // Two messages, each "id: EPOCH:SEQ" and "data: {...}", each ended by a blank line.
  const auto first_id = text.substr(4, text.find('\n') - 4);
  CHECK(text.starts_with("id: "));
  CHECK(text.ends_with("}\n\n"));
  CHECK(text.find("\n\nid: ") != std::string::npos);
  CHECK(text.find("processing") < text.find("confirmed"));
  CHECK(wakes.load() >= 1);
  // Resumed after the first: only the second comes.
  auto resumed = ProtocolSession::events(h.host, "alice", "user/alice", first_id, "", "", {});
  REQUIRE(resumed);
  std::string again;
  REQUIRE(eventually([&] {
    again += (*resumed)->poll().text;
    return again.find("confirmed") != std::string::npos;
  }));
  CHECK(again.find("processing") == std::string::npos);
  // Refusals, for the host to answer as HTTP.
  CHECK(ProtocolSession::events(h.host, "alice", "user/bob", std::nullopt, "", "", {})
            .error()
            .is(errc::forbidden));
  CHECK(ProtocolSession::events(h.host, "alice", "", std::nullopt, "", "", {}).error().is(errc::bad_request));
  CHECK(ProtocolSession::events(h.host, "alice", "user/alice", "x:1", "", "", {})
            .error()
            .is(errc::bad_request));
  CHECK(ProtocolSession::events(h.host, "alice", "user/alice", std::nullopt, "nine", "", {})
            .error()
            .is(errc::bad_request));
}

TEST_CASE("ProtocolSession::events: a client that does not read is ended with 1013 (it resumes)") {
  GatewayOptions o;
  o.max_queued_bytes = 2000;
  o.slow_consumer = SlowConsumerPolicy::drop_with_gap;  // streams always disconnect: the id resumes
  Host h(o);
  auto stream = ProtocolSession::events(h.host, "alice", "resource/hall", std::nullopt, "", "", {}).value();
  for (int i = 0; i < 100; ++i) h.bus->publish("resource/hall", boost::json::object{{"n", i}}).value();
  std::optional<ProtocolSession::Close> closed;
  for (auto out = stream->poll(); !out.empty(); out = stream->poll())
    if (out.close) closed = out.close;
  REQUIRE(closed);
  CHECK(closed->code == 1013);
  CHECK(stream->closed());
}

TEST_CASE("ProtocolSession: a message fed while another is handled on the same thread (nested feed)") {
  // A host whose wake feeds another session on the same thread handles a second request inside
  // the first (requests are parsed into a per-thread block while they are handled; the nested one
  // gets the heap instead): both are answered, and each booking is its own request's.
  Host h;
  Client inner(h, "bob");
  bool fed = false;
  ProtocolSession outer(h.host, "alice", std::nullopt, [&] {
    if (std::exchange(fed, true)) return;
    inner.session.feed(
        R"({"id":2,"op":"book","lines":[{"resource":"hall","quantity":1}],"metadata":{"note":"inner, nested"}})");
  });
  outer.feed(
      R"({"id":1,"op":"book","lines":[{"resource":"hall","quantity":1}],"metadata":{"note":"outer, fed first"}})");
  REQUIRE(fed);
  std::vector<boost::json::object> got;
  for (auto out = outer.poll(); !out.empty(); out = outer.poll())
    for (std::string_view text = out.text; !text.empty();) {
      const auto nl = text.find('\n');
      got.push_back(boost::json::parse(text.substr(0, nl)).as_object());
      text = nl == std::string_view::npos ? std::string_view{} : text.substr(nl + 1);
    }
  REQUIRE(!got.empty());
  CHECK(got.front().at("type") == "reply");
  CHECK(got.front().at("id") == 1);
  CHECK(got.front().at("ok") == true);
  REQUIRE(inner.until([](const boost::json::object& m) { return m.at("type") == "reply"; }));
  CHECK(inner.got.front().at("id") == 2);
  CHECK(inner.got.front().at("ok") == true);
  // Each booking kept its own request's metadata.
  const auto outer_id = std::string(got.front().at("result").at("booking_id").as_string());
  const auto inner_id = std::string(inner.got.front().at("result").at("booking_id").as_string());
  auto outer_booking = h.engine->get(outer_id).value();
  auto inner_booking = h.engine->get(inner_id).value();
  CHECK(outer_booking.user == "alice");
  CHECK(outer_booking.metadata.at("note") == "outer, fed first");
  CHECK(inner_booking.user == "bob");
  CHECK(inner_booking.metadata.at("note") == "inner, nested");
}
