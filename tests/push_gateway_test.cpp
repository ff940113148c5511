// The gateway through real sockets on 127.0.0.1: pushbook's own client, plus raw sockets for
// clients that misbehave.
#include <pushbook/auth.hpp>
#include <pushbook/client.hpp>
#include <pushbook/push_gateway.hpp>
#include <pushbook/redis_bus.hpp>

#include "jwt_keys.hpp"
#include "raw_socket.hpp"
#include "redis_server.hpp"
#include "temp_dir.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <dirent.h>
#include <netinet/tcp.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <mutex>
#include <optional>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using client::WsClient;
using test::Collector;
using test::RawSocket;

namespace {

constexpr const char* secret = "test-secret";

struct Server {
  std::mutex log_mutex;  // declared first: the gateway logs while it stops
  std::vector<std::string> log_lines;
  std::vector<std::string> info_lines;  // info and above: what an operator sees by default
  std::shared_ptr<LocalBus> bus = std::make_shared<LocalBus>();
  std::shared_ptr<BookingEngine> engine;
  std::unique_ptr<PushGateway> gateway;
  std::uint16_t port = 0;

  explicit Server(GatewayOptions o = {}, EngineOptions eo = {}) {
    engine = std::make_shared<BookingEngine>(bus, std::move(eo));
    engine->add_resource("room-1", 1).value();
    engine->add_resource("room-10", 10).value();
    engine->add_resource("hall", 1000).value();
    if (o.secret.empty() && !o.keys && !o.dev_insecure) o.secret = secret;
    if (o.threads == 0) o.threads = 2;
    o.log = [this](LogLevel level, std::string_view line) {
      std::lock_guard lock(log_mutex);
      log_lines.emplace_back(line);
      if (level >= LogLevel::info) info_lines.emplace_back(line);
    };
    gateway = std::make_unique<PushGateway>(bus, engine, std::move(o));
    port = gateway->listen().value();
  }

  static std::string token(const std::string& user, std::chrono::seconds ttl = 1h) {
    return sign_token(user, std::chrono::system_clock::now() + ttl, secret);
  }

  std::unique_ptr<WsClient> ws(const std::string& user) {
    client::ConnectOptions o;
    o.port = port;
    o.token = token(user);
    return WsClient::connect(o).value();
  }

  client::HttpClient http() { return client::HttpClient("127.0.0.1", port); }
};

// Approves the `n`th booking (counting from 1) a test's handler was handed, once it has come.
void approve(Collector<Completion>& pending, std::size_t n) {
  auto handed = pending.wait_for(n);
  REQUIRE(handed.size() == n);
  CHECK(handed[n - 1](Decision::approved()));
}

// Engine options for a test that decides bookings itself (`slow`: the handler hands each one to
// `pending`, see approve()) or lets them be decided at once (no handler).
EngineOptions decided_by_test(Collector<Completion>& pending, bool slow) {
  EngineOptions eo;
  if (slow) eo.handler = [&pending](const Booking&, Completion done) { pending.push(std::move(done)); };
  return eo;
}

boost::json::object book(const std::string& resource, int quantity = 1) {
  return {{"op", "book"}, {"resource", resource}, {"quantity", quantity}};
}

std::string status_of(const boost::json::object& event) {
  return std::string(event.at("data").at("status").as_string());
}

// Reads events until one for `topic` has a final status; returns that status.
std::string await_decision(WsClient& ws, const std::string& topic) {
  for (int i = 0; i < 20; ++i) {
    auto ev = ws.next(5s);
    if (!ev) return "timeout";
    if (ev->at("type") != "event" || ev->at("topic").as_string() != topic) continue;
    auto s = status_of(*ev);
    if (s != "processing") return s;
  }
  return "none";
}

// Makes `raw` a WebSocket client subscribed to resource/hall that never reads (its small receive
// buffer fills quickly); waits until the gateway holds `expected_subscriptions` in all.
void subscribe_and_never_read(Server& s, RawSocket& raw, std::int64_t expected_subscriptions) {
  REQUIRE(raw.send(test::ws_upgrade_request(Server::token("slow"))));
  REQUIRE(raw.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 101"));
  REQUIRE(raw.send(test::ws_frame(R"({"id":1,"op":"subscribe","topic":"resource/hall"})")));
  REQUIRE(test::eventually([&] { return s.gateway->stats().subscriptions == expected_subscriptions; }));
}

// The TCP_NODELAY setting of the gateway's end of the client connection `client_fd` (the
// gateway runs in this process, so its socket is one of our descriptors); nullopt until accepted.
std::optional<bool> gateway_side_no_delay(int client_fd) {
  sockaddr_in client{};
  socklen_t len = sizeof client;
  ::getsockname(client_fd, reinterpret_cast<sockaddr*>(&client), &len);
  DIR* dir = ::opendir("/proc/self/fd");
  std::optional<bool> found;
  while (dirent* e = ::readdir(dir)) {
    const int fd = std::atoi(e->d_name);
    sockaddr_in peer{};
    socklen_t peer_len = sizeof peer;
    if (fd == client_fd || ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0 ||
        peer.sin_family != AF_INET || peer.sin_port != client.sin_port)
      continue;
    int flag = 0;
    socklen_t flag_len = sizeof flag;
    ::getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &flag, &flag_len);
    found = flag != 0;
  }
  ::closedir(dir);
  return found;
}

}  // namespace

TEST_CASE("the gateway turns Nagle's algorithm off on every connection (no 40 ms stalls on small pushes)") {
  Server s;
  RawSocket c(s.port);
  // The accepted descriptor appears before the accept handler sets the option: wait for it.
  CHECK(test::eventually([&] { return gateway_side_no_delay(c.fd()) == true; }));
}

TEST_CASE("book with \"follow\":\"decision\": the decision is pushed, then the subscription ends by itself") {
  for (const bool slow : {false, true}) {
    CAPTURE(slow);
    Collector<Completion> pending;
    Server s({}, decided_by_test(pending, slow));
    auto ws = s.ws("alice");
    auto request = book("room-10");
    request["follow"] = "decision";
    auto reply = ws->request(request).value();
    REQUIRE(reply.at("ok") == true);
    const std::string id(reply.at("result").at("booking_id").as_string());
    if (slow) approve(pending, 1);
    auto ev = ws->next(5s);
    REQUIRE(ev);
    CHECK(ev->at("topic").as_string() == "booking/" + id);
    CHECK(status_of(*ev) == "confirmed");
    if (!slow) {
      // Decided before its ACK: sent from the bus's memory to this connection alone, its wire form
      // made for it and not kept with the event (Event::wire_once).
      const auto last = s.bus->last("booking/" + id);
      REQUIRE(last);
      CHECK(last->wire_once() != last->wire_once());
    }
    // Nothing to unsubscribe: the connection follows nothing once the decision is out.
    CHECK(test::eventually([&] { return s.gateway->stats().subscriptions == 0; }));
    CHECK(ws->request({{"op", "unsubscribe"}, {"topic", "booking/" + id}}).value().at("error").at("code") ==
          "not_found");
    // A later change of the booking (a cancel) is not pushed to this follower any more.
    CHECK(ws->request({{"op", "cancel"}, {"booking_id", id}}).value().at("ok") == true);
    CHECK(ws->request({{"op", "ping"}}).value().at("ok") == true);
    CHECK(!ws->next(200ms));
    // Without it ("all", the default) the subscription stays and the cancel is pushed.
    auto follow_all = book("room-10");
    follow_all["follow"] = "all";
    auto second = ws->request(follow_all).value();
    REQUIRE(second.at("ok") == true);
    const std::string id2(second.at("result").at("booking_id").as_string());
    if (slow) approve(pending, 2);
    REQUIRE(ws->next(5s));
    CHECK(ws->request({{"op", "cancel"}, {"booking_id", id2}}).value().at("ok") == true);
    auto cancelled = ws->next(5s);
    REQUIRE(cancelled);
    CHECK(status_of(*cancelled) == "cancelled");
    CHECK(s.gateway->stats().subscriptions == 1);
    // Anything else is refused before a booking is made.
    auto bad = book("room-10");
    bad["follow"] = "forever";
    auto refused = ws->request(bad).value();
    CHECK(refused.at("error").at("code") == "bad_request");
    CHECK(refused.at("error").at("message") == R"("follow" is "all" (the default) or "decision")");
  }
}

TEST_CASE("book over WebSocket: the ACK, then the decision on the same socket") {
  // Decided at once (maybe before the gateway follows the booking's topic), or by a handler the
  // test answers once the client has the ACK (after: the gateway subscribes on the connection's
  // strand before the ACK is written): either way the message after the ACK is the decision,
  // never a second "processing", and nothing follows it.
  for (const bool slow : {false, true}) {
    CAPTURE(slow);
    Collector<Completion> pending;
    Server s({}, decided_by_test(pending, slow));
    auto ws = s.ws("alice");
    auto reply = ws->request(book("room-10")).value();
    CHECK(reply.at("type") == "reply");
    CHECK(reply.at("ok") == true);
    const std::string id(reply.at("result").at("booking_id").as_string());
    CHECK(reply.at("result").at("status") == "processing");
    CHECK(reply.at("result").at("seq") == 1);
    if (slow) approve(pending, 1);
    auto ev = ws->next(5s);
    REQUIRE(ev);
    CHECK(ev->at("type") == "event");
    CHECK(ev->at("topic").as_string() == "booking/" + id);
    CHECK(ev->at("seq") == 2);
    CHECK(status_of(*ev) == "confirmed");
    CHECK(!ev->contains("snapshot"));
    auto pong = ws->request({{"op", "ping"}}).value();  // nothing came between
    CHECK(pong.at("result").at("pong") == true);
    CHECK(!ws->next(0ms));
  }
}

TEST_CASE("a node's connections following one topic are one bus subscription, fanned out to each") {
  Server s;
  const auto before = s.bus->stats().subscriptions;
  constexpr int n = 100;
  std::vector<std::unique_ptr<WsClient>> clients;
  for (int i = 0; i < n; ++i) {
    clients.push_back(s.ws("fan" + std::to_string(i)));
    auto r = clients.back()->request({{"op", "subscribe"}, {"topic", "resource/hall"}}).value();
    REQUIRE(r.at("ok") == true);
  }
  CHECK(s.bus->stats().subscriptions == before + 1);
  const auto metrics = s.http().request("GET", "/metrics").value().body;
  CHECK(metrics.find("pushbook_hub_topics 1\n") != std::string::npos);
  CHECK(metrics.find("pushbook_hub_followers 100\n") != std::string::npos);
  CHECK(metrics.find("pushbook_hub_shared_joins_total 99\n") != std::string::npos);
  for (auto& c : clients) {  // each starts with the hall's state
    auto ev = c->next(5s);
    REQUIRE(ev);
    CHECK(ev->at("snapshot") == true);
    CHECK(ev->at("data").at("available") == 1000);
  }
  auto booker = s.ws("booker");
  auto ack = booker->request(book("hall", 3)).value();
  REQUIRE(ack.at("ok") == true);
  CHECK(await_decision(*booker, "booking/" + std::string(ack.at("result").at("booking_id").as_string())) ==
        "confirmed");
  for (auto& c : clients) {  // the change reaches every follower once
    auto ev = c->next(5s);
    REQUIRE(ev);
    CHECK(ev->at("topic") == "resource/hall");
    CHECK(ev->at("data").at("available").as_int64() < 1000);
  }
  clients.clear();
  CHECK(test::eventually([&] { return s.bus->stats().subscriptions <= before + 1; }));
}

TEST_CASE("two users race for capacity 1: exactly one is confirmed") {
  Server s;
  auto a = s.ws("alice");
  auto b = s.ws("bob");
  std::string id_a, id_b;
  std::thread ta([&] {
    id_a = std::string(a->request(book("room-1")).value().at("result").at("booking_id").as_string());
  });
  std::thread tb([&] {
    id_b = std::string(b->request(book("room-1")).value().at("result").at("booking_id").as_string());
  });
  ta.join();
  tb.join();
  const auto da = await_decision(*a, "booking/" + id_a);
  const auto db = await_decision(*b, "booking/" + id_b);
  CHECK(((da == "confirmed" && db == "rejected") || (da == "rejected" && db == "confirmed")));
  CHECK(s.engine->availability("room-1").value() == 0);
}

TEST_CASE("a late subscriber gets the decision as a snapshot") {
  Server s;
  auto ack = s.engine->submit(BookingRequest{"alice", {{"room-10", 1}}, {}, {}, {}}).value();
  // The store says confirmed before the decision is published: wait for the bus to have it.
  REQUIRE(test::eventually([&] {
    auto e = s.bus->last("booking/" + ack.booking_id);
    return e && e->seq() == 2;
  }));
  auto ws = s.ws("alice");
  auto reply = ws->request({{"op", "subscribe"}, {"topic", "booking/" + ack.booking_id}}).value();
  CHECK(reply.at("ok") == true);
  auto ev = ws->next(5s).value();
  CHECK(ev.at("type") == "event");
  CHECK(ev.at("snapshot") == true);
  CHECK(ev.at("seq") == 2);
  CHECK(status_of(ev) == "confirmed");
}

TEST_CASE("after a restart a booking's state comes from the store, as a snapshot, with or without since") {
  auto store = std::make_shared<MemoryStore>();  // what outlives the process
  EngineOptions eo;
  eo.store = store;
  std::string booking_id;
  std::string old_epoch;
  {
    Server first({}, eo);
    auto ws = first.ws("alice");
    booking_id = std::string(ws->request(book("room-10")).value().at("result").at("booking_id").as_string());
    REQUIRE(await_decision(*ws, "booking/" + booking_id) == "confirmed");
    old_epoch = format_epoch(first.bus->last("booking/" + booking_id)->epoch());
  }
  Server second({}, eo);  // a new bus: it never published on booking/<id>
  const auto topic = "booking/" + booking_id;
  REQUIRE(second.bus->last(topic) == nullptr);
  const boost::json::object subscribes[] = {
      {{"op", "subscribe"}, {"topic", topic}},
      {{"op", "subscribe"}, {"topic", topic}, {"since", 1}, {"epoch", old_epoch}},
      {{"op", "subscribe"}, {"topic", topic}, {"since", 2}},  // beyond what this bus numbered
  };
  for (const auto& subscribe : subscribes) {
    CAPTURE(boost::json::serialize(subscribe));
    auto ws = second.ws("alice");
    auto request = subscribe;
    request["id"] = 1;
    REQUIRE(ws->request(request).value().at("ok") == true);
    auto ev = ws->next(5s);
    REQUIRE(ev);
    CHECK(ev->at("topic").as_string() == topic);
    CHECK(ev->at("snapshot") == true);
    CHECK(status_of(*ev) == "confirmed");
    CHECK(ev->at("data").at("version") == 2);
    CHECK(ev->at("epoch").as_string() != old_epoch);
  }
  // An epoch that is not one is refused.
  auto ws = second.ws("alice");
  auto bad = ws->request({{"id", 2}, {"op", "subscribe"}, {"topic", topic}, {"since", 1}, {"epoch", "nope"}})
                 .value();
  CHECK(bad.at("ok") == false);
  CHECK(bad.at("error").at("code") == "bad_request");
  // Someone else's booking stays forbidden after a restart too.
  auto eve = second.ws("eve");
  CHECK(eve->request({{"id", 3}, {"op", "subscribe"}, {"topic", topic}}).value().at("error").at("code") ==
        "forbidden");
}

TEST_CASE(
    "a booking's snapshot read from the store ahead of the bus is not followed by the events it contains "
    "(another node decided it and is still publishing)") {
  // Two engines on one store, as two nodes on one database; each its own bus here, so that the
  // test publishes node B's events on node A's bus when it chooses (as Redis would, late).
  auto store = std::make_shared<MemoryStore>();
  EngineOptions eo;
  eo.store = store;
  Server a({}, eo);
  auto b_bus = std::make_shared<LocalBus>();
  auto b = std::make_shared<BookingEngine>(b_bus, eo);
  b->add_resource("hall", 1000).value();
  const auto ack = b->submit(BookingRequest{"alice", {{"hall", 1}}, {}, {}, {}}).value();
  const auto topic = "booking/" + ack.booking_id;
  REQUIRE(
      test::eventually([&] { return b->get(ack.booking_id).value().status == BookingStatus::confirmed; }));
  REQUIRE(a.bus->last(topic) == nullptr);  // A's bus has nothing of it yet

  // The client (on node A) follows the booking from the ACK's version 1: the store already has
  // version 2, which comes as a snapshot.
  auto ws = a.ws("alice");
  REQUIRE(ws->request({{"id", 1}, {"op", "subscribe"}, {"topic", topic}, {"since", 1}}).value().at("ok") ==
          true);
  auto first = ws->next(5s);
  REQUIRE(first);
  CHECK(first->at("snapshot") == true);
  CHECK(first->at("data").at("version") == 2);
  // Node B's events reach A's bus now: version 1 and 2, then a cancel (version 3).
  REQUIRE(b->cancel(ack.booking_id));
  REQUIRE(test::eventually([&] { return b_bus->history(topic).size() == 3; }));
  for (const auto& ev : b_bus->history(topic)) {
    PublishOptions po;
    po.seq = ev->seq();
    REQUIRE(a.bus->publish(topic, ev->shared_data(), po));
  }
  // The client gets version 3 next: never version 1 after 2, never 2 twice.
  auto next = ws->next(5s);
  REQUIRE(next);
  CHECK(next->at("data").at("version") == 3);
  CHECK(status_of(*next) == "cancelled");
  b->shutdown();
}

TEST_CASE("since replays what was missed, without gap or duplicate") {
  Server s;
  for (int i = 0; i < 3; ++i) REQUIRE(s.engine->submit(BookingRequest{"alice", {{"hall", 1}}, {}, {}, {}}));
  REQUIRE(test::eventually([&] { return s.engine->stats().in_flight == 0; }));
  // user/alice has 6 events now: processing and confirmed of each booking.
  auto ws = s.ws("alice");
  REQUIRE(ws->request({{"op", "subscribe"}, {"topic", "user/alice"}, {"since", 2}}).value().at("ok") == true);
  std::vector<std::int64_t> seqs;
  for (int i = 0; i < 4; ++i) seqs.push_back(ws->next(5s).value().at("seq").as_int64());
  REQUIRE(s.engine->submit(BookingRequest{"alice", {{"hall", 1}}, {}, {}, {}}));
  seqs.push_back(ws->next(5s).value().at("seq").as_int64());
  seqs.push_back(ws->next(5s).value().at("seq").as_int64());
  CHECK(seqs == std::vector<std::int64_t>{3, 4, 5, 6, 7, 8});
}

TEST_CASE("another user's topics are forbidden; resource topics are public") {
  Server s;
  auto bob_booking = s.engine->submit(BookingRequest{"bob", {{"room-10", 1}}, {}, {}, {}}).value();
  auto ws = s.ws("alice");
  auto r1 = ws->request({{"op", "subscribe"}, {"topic", "user/bob"}}).value();
  CHECK(r1.at("ok") == false);
  CHECK(r1.at("error").at("code") == "forbidden");
  CHECK(r1.at("error").at("message") == "you may not subscribe to 'user/bob'");
  auto r2 = ws->request({{"op", "subscribe"}, {"topic", "booking/" + bob_booking.booking_id}}).value();
  CHECK(r2.at("error").at("code") == "forbidden");
  auto r3 = ws->request({{"op", "cancel"}, {"booking_id", bob_booking.booking_id}}).value();
  CHECK(r3.at("error").at("code") == "forbidden");
  auto r4 = ws->request({{"op", "subscribe"}, {"topic", "resource/room-10"}}).value();
  CHECK(r4.at("ok") == true);
  auto r5 = ws->request({{"op", "book"}, {"user", "bob"}, {"resource", "room-10"}}).value();
  CHECK(r5.at("error").at("code") == "forbidden");
}

TEST_CASE("missing, expired and forged tokens are refused at the handshake") {
  Server s;
  client::ConnectOptions o;
  o.port = s.port;
  auto none = WsClient::connect(o);
  REQUIRE_FALSE(none.has_value());
  CHECK(none.error().is(errc::unauthorized));
  CHECK(none.error().message.starts_with("HTTP 401: missing token"));

  o.token = sign_token("alice", std::chrono::system_clock::now() - 1h, secret);
  auto expired = WsClient::connect(o);
  CHECK(expired.error().is(errc::unauthorized));
  CHECK(expired.error().message == "HTTP 401: token expired");

  o.token = sign_token("alice", std::chrono::system_clock::now() + 1h, "another-secret");
  auto forged = WsClient::connect(o);
  CHECK(forged.error().message == "HTTP 401: bad token signature");

  o.token = Server::token("alice");
  o.token_as_subprotocol = true;  // as browsers send it
  auto ok = WsClient::connect(o);
  REQUIRE(ok.has_value());
  CHECK((*ok)->request({{"op", "ping"}}).value().at("ok") == true);
}

TEST_CASE("tokens may come as access_token for HTTP and SSE; they are never logged") {
  Server s;
  auto http = s.http();
  const auto t = Server::token("alice");
  auto r = http.request("POST", "/v1/bookings?access_token=" + t, R"({"resource":"room-10"})").value();
  CHECK(r.status == 202);
  // The key percent-encoded is the same parameter to the server, and redacted the same.
  r = http.request("POST", "/v1/bookings?x=1&access%5Ftoken=" + t, R"({"resource":"room-10"})").value();
  CHECK(r.status == 202);
  std::lock_guard lock(s.log_mutex);
  for (const auto& line : s.log_lines) CHECK(line.find(t) == std::string::npos);
  CHECK(std::any_of(s.log_lines.begin(), s.log_lines.end(), [](const auto& line) {
    return line.find("?x=1&access%5Ftoken=REDACTED") != std::string::npos;
  }));
}

TEST_CASE("a frame over max_message_bytes closes the connection with 1009") {
  GatewayOptions o;
  o.max_message_bytes = 1024;
  Server s(o);
  auto ws = s.ws("alice");
  REQUIRE(ws->send_text(std::string(2000, 'x')));
  auto closed = ws->wait_closed(5s);
  REQUIRE(closed.has_value());
  CHECK(closed->code == 1009);
  auto other = s.ws("bob");  // the server carries on
  CHECK(other->request({{"op", "ping"}}).value().at("ok") == true);
}

TEST_CASE(
    "messages arrive whole however framed: fragments, an empty first fragment, a ping between, one byte, "
    "empty") {
  // The session waits for a message's first byte alone and reads the rest after it: every way a
  // message can be cut must still reach the protocol whole.
  Server s;
  RawSocket raw(s.port);
  REQUIRE(raw.send(test::ws_upgrade_request(Server::token("alice"))));
  REQUIRE(raw.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 101"));
  // Fragments (an empty first one), with a ping frame between two of them.
  REQUIRE(raw.send(test::ws_frame("", 0x1, false) + test::ws_frame(R"({"id":1,)", 0x0, false) +
                   test::ws_frame("hi", 0x9) + test::ws_frame(R"("op":"pi)", 0x0, false) +
                   test::ws_frame(R"(ng"})", 0x0, true)));
  auto got = raw.receive_until(R"("id":1)", 5s);
  CHECK(got.find(R"("id":1,"ok":true)") != std::string::npos);
  CHECK(got.find("\x8a\x02hi") != std::string::npos);  // the pong, answered mid-message
  // A message of one byte, and an empty one: both answered (not JSON).
  REQUIRE(raw.send(test::ws_frame("x")));
  CHECK(raw.receive_until("bad_request", 5s).find("bad_request") != std::string::npos);
  REQUIRE(raw.send(test::ws_frame("")));
  CHECK(raw.receive_until("bad_request", 5s).find("bad_request") != std::string::npos);
  // A frame trickling in a byte at a time.
  const auto frame = test::ws_frame(R"({"id":2,"op":"ping"})");
  for (char c : frame) {
    REQUIRE(raw.send(std::string(1, c)));
    std::this_thread::sleep_for(1ms);  // pacing the bytes into separate segments, not a synchronisation
  }
  got = raw.receive_until(R"("id":2)", 5s);
  CHECK(got.find(R"("id":2,"ok":true)") != std::string::npos);
  // A long message (many reads) after short ones.
  const std::string pad(20000, ' ');
  REQUIRE(raw.send(test::ws_frame(R"({"id":3,"op":"ping")" + pad + "}")));
  got = raw.receive_until(R"("id":3)", 5s);
  CHECK(got.find(R"("id":3,"ok":true)") != std::string::npos);
}

TEST_CASE("malformed messages get error replies and the connection stays usable") {
  Server s;
  auto ws = s.ws("alice");
  REQUIRE(ws->send_text("not json"));
  auto r1 = ws->next_unmatched_reply(5s).value();
  CHECK(r1.at("ok") == false);
  CHECK(r1.at("error").at("code") == "bad_request");
  REQUIRE(ws->send_text(R"([1,2,3])"));
  CHECK(ws->next_unmatched_reply(5s).value().at("error").at("message") ==
        "a client message must be a JSON object");
  REQUIRE(ws->send_text(R"({"op":"ping"})"));
  CHECK(ws->next_unmatched_reply(5s).value().at("error").at("message") ==
        "every request needs an integer \"id\"");
  REQUIRE(ws->send_binary("\x01\x02"));
  CHECK(ws->next_unmatched_reply(5s).value().at("error").at("message") ==
        "binary frames are not supported; send JSON text");
  auto unknown = ws->request({{"op", "teleport"}}).value();
  CHECK(unknown.at("error").at("message") ==
        "unknown op 'teleport' (book, subscribe, unsubscribe, cancel, ping, refresh)");
  auto bad_types = ws->request({{"op", "book"}, {"resource", 5}}).value();
  CHECK(bad_types.at("error").at("message") == "request: \"resource\" must be a string");
  auto bad_since = ws->request({{"op", "subscribe"}, {"topic", "user/alice"}, {"since", -3}}).value();
  CHECK(bad_since.at("error").at("code") == "bad_request");
  auto unknown_resource = ws->request(book("room-99")).value();
  CHECK(unknown_resource.at("error").at("code") == "not_found");
  CHECK(ws->request({{"op", "ping"}}).value().at("result").at("pong") == true);
}

TEST_CASE("a slow consumer is disconnected with 1013 while a fast one on the same topic gets everything") {
  GatewayOptions o;
  o.max_queued_bytes = 512 * 1024;
  o.handshake_timeout = 1s;  // also bounds the close handshake the slow client never answers
  Server s(o);
  auto fast = s.ws("fast");
  REQUIRE(fast->request({{"op", "subscribe"}, {"topic", "resource/hall"}}).value().at("ok") == true);
  REQUIRE(fast->next(5s));  // the snapshot

  RawSocket slow(s.port, 4096);
  subscribe_and_never_read(s, slow, 2);

  // Publish in chunks the fast client keeps up with: ~16 MB in all, far more than the kernel's
  // socket buffers plus the 512 KiB queue can hold for the slow one.
  const std::string filler(2000, 'x');
  constexpr int chunks = 80, per_chunk = 100;
  std::int64_t expected_seq = 2;  // seq 1 was the snapshot
  bool in_order = true;
  int received = 0;
  for (int c = 0; c < chunks; ++c) {
    for (int i = 0; i < per_chunk; ++i)
      REQUIRE(s.bus->publish("resource/hall", boost::json::object{{"pad", filler}}));
    for (int i = 0; i < per_chunk; ++i) {
      auto ev = fast->next(10s);
      REQUIRE(ev.has_value());
      in_order = in_order && ev->at("seq").as_int64() == expected_seq++;
      ++received;
    }
  }
  CHECK(received == chunks * per_chunk);
  CHECK(in_order);
  CHECK(fast->is_open());
  CHECK(s.gateway->stats().slow_consumer_disconnects == 1);
  // The server closes the slow client's socket (its close handshake times out: it never reads).
  CHECK(slow.wait_closed(20s));
}

TEST_CASE("with drop_with_gap a slow consumer gets a gap marker naming the topic instead") {
  GatewayOptions o;
  o.max_queued_bytes = 32 * 1024;
  o.slow_consumer = SlowConsumerPolicy::drop_with_gap;
  Server s(o);
  RawSocket slow(s.port, 4096);
  subscribe_and_never_read(s, slow, 1);
  const std::string filler(2000, 'x');
  for (int i = 0; i < 8000; ++i)
    REQUIRE(s.bus->publish("resource/hall", boost::json::object{{"pad", filler}}));
  REQUIRE(test::eventually([&] { return s.gateway->stats().dropped_messages > 0; }));
  CHECK(s.gateway->stats().slow_consumer_disconnects == 0);
  // Drain: somewhere in the stream is {"type":"gap",...,"topics":["resource/hall"]}.
  const auto all = slow.receive_until(R"("topics":["resource/hall"])", 20s);
  CHECK(all.find(R"({"type":"gap","dropped":)") != std::string::npos);
}

TEST_CASE("HTTP: POST 202 with Location, GET with ETag and 304, long-poll, DELETE") {
  EngineOptions eo;
  Collector<Completion> pending;
  eo.handler = [&](const Booking&, Completion done) { pending.push(done); };
  Server s({}, eo);
  auto http = s.http();
  const std::vector<std::pair<std::string, std::string>> auth = {
      {"Authorization", "Bearer " + Server::token("alice")}};
  auto post = http.request("POST", "/v1/bookings", R"({"resource":"room-10","quantity":2})", auth).value();
  CHECK(post.status == 202);
  const std::string id(post.json().at("booking_id").as_string());
  CHECK(post.header("location") == "/v1/bookings/" + id);
  CHECK(post.json().at("status") == "processing");

  auto get = http.request("GET", "/v1/bookings/" + id, {}, auth).value();
  CHECK(get.status == 200);
  CHECK(get.header("etag") == "\"" + id + ".1\"");
  CHECK(get.json().at("status") == "processing");
  CHECK(get.json().at("seq") == 1);
  auto with_etag = auth;
  with_etag.emplace_back("If-None-Match", get.header("etag"));
  CHECK(http.request("GET", "/v1/bookings/" + id, {}, with_etag).value().status == 304);

  // Long-poll: answered when the decision is published.
  std::thread decider([&] {
    auto done = pending.wait_for(1);
    test::eventually([] { return false; }, 100ms);  // let the long-poll start waiting
    done.at(0)(Decision::approved());
  });
  auto polled = http.request("GET", "/v1/bookings/" + id + "?wait=10", {}, with_etag).value();
  decider.join();
  CHECK(polled.status == 200);
  CHECK(polled.json().at("status") == "confirmed");
  CHECK(polled.header("etag") == "\"" + id + ".2\"");

  // A long-poll that sees no change answers 304 when its time is up.
  auto current = auth;
  current.emplace_back("If-None-Match", polled.header("etag"));
  CHECK(http.request("GET", "/v1/bookings/" + id + "?wait=1", {}, current).value().status == 304);

  auto del = http.request("DELETE", "/v1/bookings/" + id, {}, auth).value();
  CHECK(del.status == 200);
  CHECK(del.json().at("status") == "cancelled");
  // Sent again (a balancer or a client after a lost answer): the same answer, nothing changed.
  auto again = http.request("DELETE", "/v1/bookings/" + id, {}, auth).value();
  CHECK(again.status == 200);
  CHECK(again.json().at("status") == "cancelled");
  CHECK(again.json().at("version") == del.json().at("version"));

  auto bob =
      std::vector<std::pair<std::string, std::string>>{{"Authorization", "Bearer " + Server::token("bob")}};
  CHECK(http.request("GET", "/v1/bookings/" + id, {}, bob).value().status == 403);
  CHECK(http.request("GET", "/v1/bookings/" + id).value().status == 401);
  CHECK(http.request("GET", "/v1/bookings/NOPE", {}, auth).value().status == 404);
  auto res = http.request("GET", "/v1/resources/room-10").value();
  CHECK(res.status == 200);
  CHECK(res.json().at("available") == 10);
}

TEST_CASE("HTTP: Idempotency-Key retries return the same booking; a different body is 422") {
  Server s;
  auto http = s.http();
  std::vector<std::pair<std::string, std::string>> h = {{"Authorization", "Bearer " + Server::token("alice")},
                                                        {"Idempotency-Key", "order-1"}};
  auto first = http.request("POST", "/v1/bookings", R"({"resource":"room-10"})", h).value();
  auto retry = http.request("POST", "/v1/bookings", R"({"resource":"room-10"})", h).value();
  CHECK(first.status == 202);
  CHECK(retry.status == 202);
  CHECK(retry.json().at("booking_id") == first.json().at("booking_id"));
  CHECK(retry.header("idempotent-replayed") == "true");
  auto conflict = http.request("POST", "/v1/bookings", R"({"resource":"room-10","quantity":2})", h).value();
  CHECK(conflict.status == 422);
  CHECK(conflict.json().at("error").at("code") == "idempotency_conflict");
}

TEST_CASE("HTTP: bad input gets a JSON error with the right status") {
  GatewayOptions o;
  o.max_body_bytes = 1000;
  Server s(o);
  auto http = s.http();
  const std::vector<std::pair<std::string, std::string>> auth = {
      {"Authorization", "Bearer " + Server::token("alice")}};
  auto bad_json = http.request("POST", "/v1/bookings", "{nope", auth).value();
  CHECK(bad_json.status == 400);
  CHECK(bad_json.json().at("error").at("code") == "bad_request");
  CHECK(http.request("POST", "/v1/bookings", R"({"resource":"room-10","quantity":0})", auth).value().status ==
        400);
  CHECK(
      http.request("POST", "/v1/bookings", R"({"resource":"room-10","quantity":11})", auth).value().status ==
      422);
  CHECK(http.request("GET", "/v1/nothing").value().status == 404);
  auto wrong_method = http.request("PUT", "/v1/bookings").value();
  CHECK(wrong_method.status == 405);
  CHECK(wrong_method.header("allow") == "POST");
  auto big = s.http().request("POST", "/v1/bookings", std::string(5000, ' '), auth).value();
  CHECK(big.status == 413);
  CHECK(big.json().at("error").at("code") == "too_large");
  CHECK(http.request("GET", "/healthz").value().body == R"({"status":"ok","store":"up","bus":"up"})");
}

TEST_CASE("SSE: events with id, resume with Last-Event-ID") {
  Server s;
  for (int i = 0; i < 2; ++i) REQUIRE(s.engine->submit(BookingRequest{"alice", {{"hall", 1}}, {}, {}, {}}));
  REQUIRE(test::eventually([&] { return s.engine->stats().in_flight == 0; }));  // user/alice: seq 1..4
  const auto epoch = format_epoch(s.bus->last("user/alice")->epoch());
  auto id = [&](int seq) { return fmt::format("id: {}:{}\n", epoch, seq); };
  RawSocket sse(s.port);
  REQUIRE(sse.send("GET /v1/events?topic=user/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                   Server::token("alice") + "\r\nLast-Event-ID: 2\r\n\r\n"));  // a bare seq: this epoch
  auto got = sse.receive_until(id(4), 5s);
  CHECK(got.starts_with("HTTP/1.1 200 OK\r\n"));
  CHECK(got.find("Content-Type: text/event-stream") != std::string::npos);
  CHECK(got.find(id(2)) == std::string::npos);
  CHECK(got.find(id(3) + "data: {\"type\":\"event\",\"topic\":\"user/alice\",\"seq\":3,\"epoch\":\"" + epoch +
                 "\",") != std::string::npos);
  CHECK(got.find(id(4)) != std::string::npos);
  REQUIRE(s.engine->submit(BookingRequest{"alice", {{"hall", 1}}, {}, {}, {}}));
  CHECK(sse.receive_until(id(6), 5s).find(id(6)) != std::string::npos);

  // The id as sent resumes too; an id of another epoch (a restarted server) gets a snapshot.
  RawSocket resumed(s.port);
  REQUIRE(resumed.send("GET /v1/events?topic=user/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                       Server::token("alice") + "\r\nLast-Event-ID: " + epoch + ":5\r\n\r\n"));
  got = resumed.receive_until(id(6), 5s);
  CHECK(got.find(id(5)) == std::string::npos);
  CHECK(got.find(id(6) + "data: {\"type\":\"event\",") != std::string::npos);
  RawSocket stale(s.port);
  const auto other_epoch = format_epoch(s.bus->last("user/alice")->epoch() + 1);
  REQUIRE(stale.send("GET /v1/events?topic=user/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                     Server::token("alice") + "\r\nLast-Event-ID: " + other_epoch + ":2\r\n\r\n"));
  got = stale.receive_until(id(6), 5s);
  CHECK(got.find(id(6) + "data: {\"type\":\"event\",\"topic\":\"user/alice\",\"seq\":6,\"epoch\":\"" + epoch +
                 "\",\"ts\":") != std::string::npos);
  CHECK(got.find("\"snapshot\":true") != std::string::npos);
  CHECK(got.find(id(3)) == std::string::npos);  // no replay of a numbering the client never had
  RawSocket bad(s.port);
  REQUIRE(bad.send("GET /v1/events?topic=user/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                   Server::token("alice") + "\r\nLast-Event-ID: zz:2\r\n\r\n"));
  CHECK(bad.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 400"));

  RawSocket forbidden(s.port);
  REQUIRE(forbidden.send("GET /v1/events?topic=user/bob HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                         Server::token("alice") + "\r\n\r\n"));
  CHECK(forbidden.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 403"));
}

TEST_CASE("graceful shutdown closes WebSockets with 1001 going away") {
  Server s;
  auto ws = s.ws("alice");
  REQUIRE(ws->request({{"op", "ping"}}).value().at("ok") == true);
  std::thread stopper([&] { s.gateway->stop(); });
  auto closed = ws->wait_closed(10s);
  stopper.join();
  REQUIRE(closed.has_value());
  CHECK(closed->code == 1001);
  CHECK(closed->reason == "going away");
}

TEST_CASE("connections accepted while stop() runs are ended too, not left for the shutdown timeout") {
  GatewayOptions o;
  o.shutdown_timeout = 20s;  // an idle connection the shutdown missed would hold stop() 10 s
  Server s(o);
  std::atomic<bool> stopped{false};
  std::vector<std::unique_ptr<RawSocket>> sockets;
  std::thread connector([&] {  // new connections keep arriving until stop() returns
    while (!stopped.load() && sockets.size() < 2000) sockets.push_back(std::make_unique<RawSocket>(s.port));
  });
  REQUIRE(test::eventually([&] { return s.gateway->stats().connections_total >= 20; }));
  const auto start = std::chrono::steady_clock::now();
  s.gateway->stop();
  const auto took = std::chrono::steady_clock::now() - start;
  stopped = true;
  connector.join();
  CHECK(took < 8s);
  MESSAGE(sockets.size() << " connections opened, stop() took "
                         << std::chrono::duration_cast<std::chrono::milliseconds>(took).count() << " ms");
}

TEST_CASE("graceful shutdown drains: healthz 503, no new bookings, decisions in flight pushed, then 1001") {
  std::mutex deciders_mutex;
  std::vector<std::thread> deciders;
  EngineOptions eo;
  eo.handler = [&](const Booking&, Completion done) {  // a business step of 800 ms
    std::lock_guard lock(deciders_mutex);
    deciders.emplace_back([done] {
      std::this_thread::sleep_for(800ms);  // the slow business step itself, not a synchronisation
      done(Decision::approved());
    });
  };
  GatewayOptions o;
  o.shutdown_timeout = 5s;
  {
    Server s(o, eo);
    auto ws = s.ws("alice");
    const auto id =
        std::string(ws->request(book("room-10")).value().at("result").at("booking_id").as_string());
    std::thread stopper([&] { s.gateway->stop(); });
    // Draining: a new connection's /healthz says 503, so a balancer stops sending here...
    CHECK(test::eventually(
        [&] {
          auto r = client::HttpClient("127.0.0.1", s.port).request("GET", "/healthz");
          return r && r->status == 503;
        },
        5s));
    // ...a new booking is refused...
    auto refused = ws->request(book("room-10")).value();
    CHECK(refused.at("ok") == false);
    CHECK(refused.at("error").at("code") == "overloaded");
    // ...and the booking in flight is decided and pushed before the socket closes with 1001.
    CHECK(await_decision(*ws, "booking/" + id) == "confirmed");
    auto closed = ws->wait_closed(10s);
    stopper.join();
    REQUIRE(closed.has_value());
    CHECK(closed->code == 1001);
  }
  std::lock_guard lock(deciders_mutex);
  for (auto& t : deciders) t.join();
}

TEST_CASE("the Origin allow-list refuses cross-site WebSocket upgrades") {
  GatewayOptions o;
  o.allowed_origins = {"https://app.example.com"};
  Server s(o);
  client::ConnectOptions c;
  c.port = s.port;
  c.token = Server::token("alice");
  c.origin = "https://evil.example.net";
  auto refused = WsClient::connect(c);
  CHECK(refused.error().is(errc::forbidden));
  c.origin = "https://app.example.com";
  CHECK(WsClient::connect(c).has_value());
  // Booking and cancelling from another site's page is refused too (CSRF); reads are not.
  auto http = s.http();
  const auto auth = std::pair<std::string, std::string>{"Authorization", "Bearer " + Server::token("alice")};
  auto evil = std::pair<std::string, std::string>{"Origin", "https://evil.example.net"};
  auto good = std::pair<std::string, std::string>{"Origin", "https://app.example.com"};
  CHECK(http.request("POST", "/v1/bookings", R"({"resource":"room-10"})", {auth, evil}).value().status ==
        403);
  auto booked = http.request("POST", "/v1/bookings", R"({"resource":"room-10"})", {auth, good}).value();
  REQUIRE(booked.status == 202);
  const auto id = std::string(boost::json::parse(booked.body).at("booking_id").as_string());
  CHECK(http.request("DELETE", "/v1/bookings/" + id, "", {auth, evil}).value().status == 403);
  CHECK(http.request("GET", "/v1/bookings/" + id, "", {auth, evil}).value().status == 200);
}

TEST_CASE("rate limit: rate_limited replies, then close 1008 when it goes on") {
  GatewayOptions o;
  o.rate_limit_per_second = 1;
  o.rate_limit_burst = 3;
  Server s(o);
  auto ws = s.ws("alice");
  for (int i = 0; i < 3; ++i) REQUIRE(ws->request({{"op", "ping"}}).value().at("ok") == true);
  auto limited = ws->request({{"op", "ping"}}, 2s);
  // The refusal carries no id (the message was not read): it comes as an unmatched reply.
  auto refusal = ws->next_unmatched_reply(5s).value();
  CHECK(refusal.at("error").at("code") == "rate_limited");
  for (int i = 0; i < 10; ++i) (void)ws->send_text(R"({"id":99,"op":"ping"})");
  auto closed = ws->wait_closed(5s);
  REQUIRE(closed.has_value());
  CHECK(closed->code == 1008);
  CHECK(closed->reason == "rate limit exceeded");
}

TEST_CASE("at most max_subscriptions per connection") {
  GatewayOptions o;
  o.max_subscriptions = 2;
  Server s(o);
  auto ws = s.ws("alice");
  CHECK(ws->request({{"op", "subscribe"}, {"topic", "resource/hall"}}).value().at("ok") == true);
  CHECK(ws->request({{"op", "subscribe"}, {"topic", "resource/room-1"}}).value().at("ok") == true);
  auto third = ws->request({{"op", "subscribe"}, {"topic", "resource/room-10"}}).value();
  CHECK(third.at("error").at("code") == "too_large");
  CHECK(ws->request({{"op", "unsubscribe"}, {"topic", "resource/hall"}}).value().at("ok") == true);
  CHECK(ws->request({{"op", "subscribe"}, {"topic", "resource/room-10"}}).value().at("ok") == true);
  CHECK(ws->request({{"op", "unsubscribe"}, {"topic", "resource/hall"}}).value().at("error").at("code") ==
        "not_found");
}

TEST_CASE("an expiring token gets a notice; refresh keeps the socket, silence closes it with 4001") {
  GatewayOptions o;
  o.token_leeway = 0s;
  o.token_refresh_grace = 1s;  // the notice -> refresh round trip must fit, under sanitizers too
  Server s(o);
  client::ConnectOptions c;
  c.port = s.port;
  // exp is whole seconds (truncated): +1s may leave a few ms, less than the two handshakes.
  c.token = sign_token("alice", std::chrono::system_clock::now() + 2s, secret);
  auto refresher = WsClient::connect(c).value();
  auto silent = WsClient::connect(c).value();
  auto notice = refresher->next(10s).value();
  CHECK(notice.at("type") == "notice");
  CHECK(notice.at("code") == "token_expired");
  auto r = refresher->request({{"op", "refresh"}, {"token", Server::token("alice")}}).value();
  CHECK(r.at("ok") == true);
  auto wrong_user = refresher->request({{"op", "refresh"}, {"token", Server::token("bob")}}).value();
  CHECK(wrong_user.at("error").at("code") == "forbidden");
  auto closed = silent->wait_closed(10s);
  REQUIRE(closed.has_value());
  CHECK(closed->code == 4001);
  CHECK(closed->reason == "token expired");
  CHECK(refresher->request({{"op", "ping"}}).value().at("ok") == true);
}

TEST_CASE("beyond max_connections new connections get 503") {
  GatewayOptions o;
  o.max_connections = 2;
  Server s(o);
  auto a = s.ws("a");
  auto b = s.ws("b");
  client::ConnectOptions c;
  c.port = s.port;
  c.token = Server::token("c");
  auto refused = WsClient::connect(c);
  CHECK(refused.error().is(errc::overloaded));
  a.reset();
  CHECK(test::eventually([&] { return WsClient::connect(c).has_value(); }));
}

TEST_CASE("a client that sends its request head too slowly is cut (slow-loris)") {
  GatewayOptions o;
  o.handshake_timeout = 200ms;
  Server s(o);
  RawSocket loris(s.port);
  REQUIRE(loris.send("GET /healthz HTTP/1.1\r\nHost: x\r\n"));  // never finishes the head
  CHECK(loris.wait_closed(5s));
  CHECK(s.http().request("GET", "/healthz").value().status == 200);
}

TEST_CASE("chunked encoding cannot make an unauthenticated client's buffer grow (413/431, then close)") {
  GatewayOptions o;
  o.handshake_timeout = 60s;  // only the read-buffer bound may end these requests in time
  Server s(o);
  const std::string head = "POST /v1/bookings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
  struct Case {
    const char* name;
    std::string prefix;
    char filler;
  };
  const Case cases[] = {
      {"endless leading zeros in a chunk size", "", '0'},
      {"a chunk extension without CRLF", "1;ext=", 'a'},
      {"a trailer without CRLF", "1\r\nx\r\n0\r\nX-Trailer: ", 'a'},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    RawSocket raw(s.port);
    REQUIRE(raw.connected());
    REQUIRE(raw.send(head + c.prefix));
    // 96 KiB: three times the bound. The server may close while this is still being sent.
    raw.send(std::string(96 * 1024, c.filler));
    const auto reply = raw.receive_until("\r\n\r\n", 5s);
    const bool refused = reply.starts_with("HTTP/1.1 413") || reply.starts_with("HTTP/1.1 431");
    CHECK_MESSAGE(refused, reply.substr(0, 80));
    CHECK(raw.wait_closed(5s));
  }
  CHECK(s.http().request("GET", "/healthz").value().status == 200);
}

TEST_CASE("after a first request, a slow next head on a keep-alive connection gets the handshake timeout") {
  GatewayOptions o;
  o.handshake_timeout = 300ms;
  o.idle_timeout = 60s;  // what it used to get
  Server s(o);
  RawSocket raw(s.port);
  REQUIRE(raw.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
  REQUIRE(raw.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 200"));
  REQUIRE(raw.send("GET /healthz HTTP/1.1\r\nHost: x\r\n"));  // never finishes the head
  CHECK(raw.wait_closed(5s));
}

TEST_CASE(
    "long-poll wait: infinite or huge means as long as allowed, NaN is refused, no undefined conversion") {
  GatewayOptions o;
  o.max_long_poll = 1s;
  Server s(o);
  auto ws = s.ws("alice");
  auto id = std::string(ws->request(book("room-10")).value().at("result").at("booking_id").as_string());
  REQUIRE(await_decision(*ws, "booking/" + id) == "confirmed");
  auto http = s.http();
  const auto auth = std::pair<std::string, std::string>{"Authorization", "Bearer " + Server::token("alice")};
  const auto etag = http.request("GET", "/v1/bookings/" + id, "", {auth}).value().header("etag");
  for (const char* wait : {"inf", "1e19", "1e300"}) {
    CAPTURE(wait);
    const auto t0 = std::chrono::steady_clock::now();
    auto r = http.request("GET", "/v1/bookings/" + id + "?wait=" + wait, "", {auth, {"If-None-Match", etag}})
                 .value();
    CHECK(r.status == 304);
    CHECK(std::chrono::steady_clock::now() - t0 >= 900ms);  // waited, capped at max_long_poll
  }
  CHECK(http.request("GET", "/v1/bookings/" + id + "?wait=nan", "", {auth}).value().status == 400);
}

TEST_CASE("static files: only regular files, so GET /. is 404") {
  const test::TempDir temp("pushbook-static");
  const std::string dir = temp.path();
  { std::ofstream(temp.file("index.html")) << "<h1>hi</h1>"; }
  GatewayOptions o;
  o.static_dir = dir;
  Server s(o);
  auto http = s.http();
  CHECK(http.request("GET", "/").value().status == 200);
  CHECK(http.request("GET", "/index.html").value().body == "<h1>hi</h1>");
  CHECK(http.request("GET", "/.").value().status == 404);
  CHECK(http.request("GET", "/nothing.js").value().status == 404);
}

TEST_CASE("an idle WebSocket that answers no ping is closed after idle_timeout") {
  GatewayOptions o;
  o.idle_timeout = 1s;  // pinged after 500 ms, closed after 1 s of silence
  Server s(o);
  RawSocket silent(s.port);
  REQUIRE(silent.send(test::ws_upgrade_request(Server::token("alice"))));
  REQUIRE(silent.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 101"));
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(silent.wait_closed(5s));  // never answers the server's ping
  CHECK(std::chrono::steady_clock::now() - t0 >= 800ms);
  auto alive = s.ws("bob");                             // a client that answers pings (Beast does) stays
  CHECK_FALSE(alive->wait_closed(2200ms).has_value());  // still open after two idle timeouts
  CHECK(alive->request({{"op", "ping"}}).value().at("ok") == true);
}

TEST_CASE("dev_insecure takes the user from ?user=; without a secret and without it, no gateway") {
  GatewayOptions o;
  o.dev_insecure = true;
  Server s(o);
  client::ConnectOptions c;
  c.port = s.port;
  c.target = "/v1/ws?user=dev";
  auto ws = WsClient::connect(c).value();
  auto reply = ws->request(book("room-10")).value();
  CHECK(reply.at("ok") == true);
  {
    std::lock_guard lock(s.log_mutex);
    CHECK(std::any_of(s.log_lines.begin(), s.log_lines.end(), [](const std::string& line) {
      return line.find("DEVELOPMENT MODE") != std::string::npos;
    }));
  }
  auto bus = std::make_shared<LocalBus>();
  auto engine = std::make_shared<BookingEngine>(bus);
  CHECK_THROWS_AS(PushGateway(bus, engine, GatewayOptions{}), Exception);
}

TEST_CASE("GET /v1/whoami tells a good token from a refused one") {
  Server s;
  auto http = s.http();
  auto good =
      http.request("GET", "/v1/whoami", "", {{"Authorization", "Bearer " + Server::token("alice")}}).value();
  CHECK(good.status == 200);
  auto body = boost::json::parse(good.body).as_object();
  CHECK(body.at("user") == "alice");
  CHECK(body.at("expires_at").as_int64() > 0);
  auto forged = sign_token("alice", std::chrono::system_clock::now() + 1h, "another-secret");
  CHECK(http.request("GET", "/v1/whoami", "", {{"Authorization", "Bearer " + forged}}).value().status == 401);
  CHECK(http.request("GET", "/v1/whoami").value().status == 401);
  CHECK(http.request("POST", "/v1/whoami").value().status == 405);
}

TEST_CASE(
    "set_keys: a reload takes effect for new connections and refreshes; open ones keep their identity") {
  auto first = std::make_shared<KeySet>();
  REQUIRE(first->add_hs256("k1", "first-secret").has_value());
  GatewayOptions o;
  o.keys = first;
  Server s(o);
  const auto exp = std::chrono::system_clock::now() + 1h;
  client::ConnectOptions c;
  c.port = s.port;
  c.token = sign_token("alice", exp, "first-secret", "k1");
  auto alice = WsClient::connect(c).value();
  CHECK(alice->request({{"op", "ping"}}).value().at("ok") == true);

  // The rotation's last step: k2 signs and k1 is gone.
  auto second = std::make_shared<KeySet>();
  REQUIRE(second->add_hs256("k2", "second-secret").has_value());
  REQUIRE(s.gateway->set_keys(second).has_value());
  CHECK(s.gateway->keys() == second);

  auto refused = WsClient::connect(c);
  REQUIRE_FALSE(refused.has_value());
  CHECK(refused.error().message == R"(HTTP 401: unknown key id "k1")");
  auto http = s.http();
  CHECK(http.request("GET", "/v1/whoami", "", {{"Authorization", "Bearer " + c.token}}).value().status ==
        401);
  const auto k2_token = sign_token("alice", exp, "second-secret", "k2");
  CHECK(http.request("GET", "/v1/whoami", "", {{"Authorization", "Bearer " + k2_token}}).value().status ==
        200);
  c.token = sign_token("bob", exp, "second-secret", "k2");
  CHECK(WsClient::connect(c).has_value());

  // Alice's socket is still Alice's; a refresh is verified with the new keys.
  CHECK(alice->request({{"op", "subscribe"}, {"topic", "user/alice"}}).value().at("ok") == true);
  auto old_refresh =
      alice->request({{"op", "refresh"}, {"token", sign_token("alice", exp, "first-secret", "k1")}}).value();
  CHECK(old_refresh.at("error").at("code") == "unauthorized");
  CHECK(alice->request({{"op", "refresh"}, {"token", k2_token}}).value().at("ok") == true);

  // A set that cannot be used is refused and the keys in use stay.
  CHECK(s.gateway->set_keys(nullptr).error().message == "set_keys: an empty key set");
  CHECK(s.gateway->set_keys(std::make_shared<KeySet>()).error().is(errc::bad_request));
  CHECK(s.gateway->keys() == second);
  std::lock_guard lock(s.log_mutex);
  CHECK(std::count(s.info_lines.begin(), s.info_lines.end(), "token keys replaced: 1 keys") == 1);
}

TEST_CASE("an identity provider's RS256 and ES256 tokens, by kid from a JWKS; no algorithm confusion") {
  const auto rsa = test::KeyPair::rsa();
  const auto ec = test::KeyPair::ec();
  GatewayOptions o;
  o.keys = std::make_shared<const KeySet>(
      KeySet::from_jwks(R"({"keys":[)" + rsa.jwk("idp-rsa") + "," + ec.jwk("idp-ec") + "]}").value());
  Server s(o);
  const auto claims = fmt::format(R"({{"sub":"alice","exp":{}}})",
                                  std::chrono::duration_cast<std::chrono::seconds>(
                                      (std::chrono::system_clock::now() + 1h).time_since_epoch())
                                      .count());
  auto http = s.http();
  auto whoami = [&](const std::string& token) {
    return http.request("GET", "/v1/whoami", "", {{"Authorization", "Bearer " + token}}).value();
  };
  auto rs = whoami(test::signed_with(rsa, R"({"alg":"RS256","kid":"idp-rsa"})", claims));
  CHECK(rs.status == 200);
  CHECK(boost::json::parse(rs.body).at("user") == "alice");
  client::ConnectOptions c;
  c.port = s.port;
  c.token = test::signed_with(ec, R"({"alg":"ES256","kid":"idp-ec"})", claims);
  CHECK(WsClient::connect(c).has_value());

  // HS256 "signed" with the RSA key's public PEM: refused.
  const auto confused =
      whoami(test::hs256_signed(rsa.public_pem(), R"({"alg":"HS256","kid":"idp-rsa"})", claims));
  CHECK(confused.status == 401);
  CHECK(boost::json::parse(confused.body).at("error").at("message") ==
        R"(token algorithm HS256 does not match key "idp-rsa" (RS256))");
  // Tokens without kid have no key here (no default key), and demo tokens need an HS256 key.
  CHECK(whoami(sign_token("alice", std::chrono::system_clock::now() + 1h, "x")).status == 401);
  o.demo_token_ttl = 60s;
  CHECK_THROWS_AS(Server{o}, Exception);
  o.demo_token_ttl = 0s;
  o.secret = "and-a-secret";
  CHECK_THROWS_AS(Server{o}, Exception);  // secret or keys, not both
}

TEST_CASE("GET /v1/resources lists every resource without a token") {
  Server s;
  auto res = s.http().request("GET", "/v1/resources").value();
  CHECK(res.status == 200);
  const auto body = res.json();
  const auto& all = body.at("resources").as_array();
  REQUIRE(all.size() == 3);
  CHECK(all[0].at("resource") == "hall");
  CHECK(all[0].at("available") == 1000);
  CHECK(s.http().request("POST", "/v1/resources", "{}").value().status == 405);
  CHECK(s.http().request("GET", "/v1/resources/nope").value().status == 404);
}

TEST_CASE("demo mode: POST /v1/demo/token hands out short-lived tokens; a good one renews the same user") {
  SUBCASE("off unless asked for") {
    Server s;
    CHECK(s.http().request("POST", "/v1/demo/token").value().status == 404);
  }
  SUBCASE("needs a secret") {
    GatewayOptions o;
    o.dev_insecure = true;
    o.demo_token_ttl = 60s;
    auto bus = std::make_shared<LocalBus>();
    CHECK_THROWS_AS(PushGateway(bus, std::make_shared<BookingEngine>(bus), o), Exception);
  }
  SUBCASE("on") {
    GatewayOptions o;
    o.demo_token_ttl = 60s;
    Server s(o);
    auto http = s.http();
    CHECK(http.request("GET", "/v1/demo/token").value().status == 405);
    auto first = http.request("POST", "/v1/demo/token").value();
    REQUIRE(first.status == 200);
    const std::string token(first.json().at("token").as_string());
    const std::string user(first.json().at("user").as_string());
    CHECK(user.starts_with("demo-"));
    auto claims = verify_token(token, secret).value();
    CHECK(claims.subject == user);
    CHECK(claims.expires_at <= std::chrono::system_clock::now() + 61s);
    CHECK(
        first.json().at("expires_at").as_int64() ==
        std::chrono::duration_cast<std::chrono::milliseconds>(claims.expires_at.time_since_epoch()).count());
    // A second visitor is someone else; the first renews as itself.
    CHECK(http.request("POST", "/v1/demo/token").value().json().at("user") != user.c_str());
    auto renewed = http.request("POST", "/v1/demo/token", {}, {{"Authorization", "Bearer " + token}}).value();
    CHECK(renewed.status == 200);
    CHECK(renewed.json().at("user") == user.c_str());
    // Tokens that are not good demo tokens are refused, not silently swapped for a new user.
    CHECK(http.request("POST", "/v1/demo/token", {}, {{"Authorization", "Bearer junk"}}).value().status ==
          401);
    CHECK(http.request("POST", "/v1/demo/token", {}, {{"Authorization", "Bearer " + Server::token("alice")}})
              .value()
              .status == 403);
    // The token works on the WebSocket like any other.
    client::ConnectOptions co;
    co.port = s.port;
    co.token = token;
    auto ws = WsClient::connect(co).value();
    CHECK(ws->request(book("room-10")).value().at("ok") == true);
  }
}

TEST_CASE("new demo users are rate limited (429 with Retry-After); issuing one is not logged at info") {
  GatewayOptions o;
  o.demo_token_ttl = 60s;
  Server s(o);
  auto http = s.http();
  int ok = 0, limited = 0;
  for (int i = 0; i < 300 && limited == 0; ++i) {
    auto r = http.request("POST", "/v1/demo/token").value();
    if (r.status == 200) ++ok;
    if (r.status == 429) {
      ++limited;
      CHECK(r.header("retry-after") == "1");
      CHECK(r.json().at("error").at("code") == "rate_limited");
    }
  }
  CHECK(limited == 1);
  CHECK(ok >= 100);  // the burst
  CHECK(ok < 300);
  std::lock_guard lock(s.log_mutex);
  for (const auto& line : s.info_lines) CHECK(line.find("demo token issued") == std::string::npos);
}

TEST_CASE("/metrics speaks the Prometheus text format") {
  Server s;
  auto ws = s.ws("alice");
  REQUIRE(ws->request(book("room-10")).value().at("ok") == true);
  auto m = s.http().request("GET", "/metrics").value();
  CHECK(m.status == 200);
  CHECK(m.header("content-type") == "text/plain; version=0.0.4; charset=utf-8");
  CHECK(m.body.find("# TYPE pushbook_connections gauge\n") != std::string::npos);
  CHECK(m.body.find("pushbook_connections{kind=\"websocket\"} 1\n") != std::string::npos);
  CHECK(m.body.find("pushbook_bookings_total{outcome=\"accepted\"} 1\n") != std::string::npos);
  CHECK(m.body.find("pushbook_booking_decision_latency_seconds{quantile=\"0.99\"}") != std::string::npos);
}

namespace {
// The value of an unlabelled metric in a /metrics body; nullopt when the line is absent.
std::optional<std::string> metric_value(const std::string& body, const std::string& name) {
  const auto at = body.find("\n" + name + " ");
  if (at == std::string::npos) return std::nullopt;
  const auto start = at + name.size() + 2;
  return body.substr(start, body.find('\n', start) - start);
}
}  // namespace

TEST_CASE("/metrics counts a LocalBus's events and subscriptions") {
  Server s;
  for (int i = 0; i < 3; ++i) REQUIRE(s.bus->publish("test/metrics", boost::json::object{{"n", i}}));
  Collector<int> seen;
  auto sub = s.bus->subscribe("test/other", [&](const Delivery&) { seen.push(1); }).value();
  auto body = s.http().request("GET", "/metrics").value().body;
  CHECK(body.find("# TYPE pushbook_bus_published_total counter\n") != std::string::npos);
  CHECK(body.find("pushbook_bus_info{kind=\"local\"} 1\n") != std::string::npos);
  // 3 + the availability of each of the Server's 3 resources (published by add_resource).
  CHECK(metric_value(body, "pushbook_bus_published_total") == "6");
  CHECK(metric_value(body, "pushbook_bus_subscriptions") == "1");
  CHECK(metric_value(body, "pushbook_bus_topics") == "5");  // resource/*, test/metrics, test/other
  CHECK(metric_value(body, "pushbook_bus_dropped_total") == "0");
  CHECK_FALSE(metric_value(body, "pushbook_bus_reconnects_total"));  // a RedisBus's only
  CHECK(s.gateway->metrics_text().find("pushbook_bus_published_total 6\n") != std::string::npos);
  CHECK(s.gateway->metrics_text().find("pushbook_hub_topics 0\n") != std::string::npos);  // the same text
}

TEST_CASE("/metrics of a gateway over a RedisBus counts the reconnect after Redis restarts") {
  test::RedisServer redis;
  RedisBusOptions ro;
  ro.address = redis.address();
  ro.reconnect_max = 200ms;
  auto bus = std::make_shared<RedisBus>(ro);
  REQUIRE(bus->wait_connected(10s));
  auto engine = std::make_shared<BookingEngine>(bus);
  engine->add_resource("room-1", 1).value();
  GatewayOptions o;
  o.secret = secret;
  o.threads = 1;
  PushGateway gateway(bus, engine, o);
  const auto port = gateway.listen().value();
  auto metrics = [&] {
    return client::HttpClient("127.0.0.1", port).request("GET", "/metrics").value().body;
  };

  REQUIRE(bus->publish("test/metrics", boost::json::object{{"n", 1}}));
  auto body = metrics();
  CHECK(body.find("pushbook_bus_info{kind=\"redis\"} 1\n") != std::string::npos);
  CHECK(body.find("# TYPE pushbook_bus_reconnects_total counter\n") != std::string::npos);
  CHECK(metric_value(body, "pushbook_bus_connected") == "1");
  CHECK(metric_value(body, "pushbook_bus_published_total") == "2");  // and resource/room-1's availability
  CHECK(metric_value(body, "pushbook_bus_reconnects_total") == "0");
  CHECK(metric_value(body, "pushbook_bus_publish_failures_total") == "0");

  redis.kill();
  CHECK(test::eventually([&] { return metric_value(metrics(), "pushbook_bus_connected") == "0"; }));
  CHECK_FALSE(bus->publish("test/metrics", boost::json::object{{"n", 2}}));
  CHECK(metric_value(metrics(), "pushbook_bus_publish_failures_total") ==
        std::to_string(bus->stats().publish_failures));
  CHECK(bus->stats().publish_failures >= 1);

  redis.start();
  REQUIRE(bus->wait_connected(10s));
  body = metrics();
  CHECK(metric_value(body, "pushbook_bus_connected") == "1");
  CHECK(metric_value(body, "pushbook_bus_reconnects_total") ==
        "2");  // the command and the subscriber connection
  gateway.stop();
}

TEST_CASE("a socket the host accepted itself can be handed over") {
  Server s;
  // Accept on a listener of our own, then hand the socket to the gateway.
  int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  REQUIRE(::listen(lfd, 4) == 0);
  socklen_t len = sizeof addr;
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  RawSocket c(ntohs(addr.sin_port));
  int accepted = ::accept(lfd, nullptr, nullptr);
  REQUIRE(accepted >= 0);
  s.gateway->accept_socket(accepted);
  REQUIRE(c.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
  CHECK(c.receive_until("\"ok\"", 5s).starts_with("HTTP/1.1 200 OK"));
  CHECK(gateway_side_no_delay(c.fd()) == true);
  ::close(lfd);
}

TEST_CASE("garbage on the wire never takes the server down") {
  Server s;
  const auto seed = std::random_device{}();
  std::printf("push_gateway_test garbage: seed %u\n", seed);
  INFO("seed = ", seed);
  std::mt19937 rng(seed);
  auto random_bytes = [&](std::size_t n) {
    std::string b(n, '\0');
    for (auto& c : b) c = static_cast<char>(rng() & 0xFF);
    return b;
  };
  const std::string valid_head = "POST /v1/bookings HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n";
  for (int round = 0; round < 60; ++round) {
    RawSocket raw(s.port);
    REQUIRE(raw.connected());
    switch (round % 6) {
      case 0: raw.send(random_bytes(1 + rng() % 2000)); break;                   // noise
      case 1: raw.send(valid_head.substr(0, rng() % valid_head.size())); break;  // truncated head
      case 2: raw.send(valid_head + random_bytes(rng() % 30)); break;            // truncated body
      case 3: raw.send("GET /v1/bookings/" + random_bytes(20) + " HTTP/1.1\r\n\r\n"); break;
      case 4: {  // a WebSocket that sends random frames
        raw.send(test::ws_upgrade_request(Server::token("fuzz")));
        raw.receive_until("\r\n\r\n", 2s);
        raw.send(test::ws_frame(random_bytes(rng() % 300), static_cast<std::uint8_t>(rng() % 16), rng() % 2));
        raw.send(random_bytes(rng() % 100));
        break;
      }
      case 5: {  // valid frames with random JSON-ish text
        raw.send(test::ws_upgrade_request(Server::token("fuzz")));
        raw.receive_until("\r\n\r\n", 2s);
        const char* texts[] = {
            R"({"id":1,"op":"book","lines":[{"resource":null}]})",
            R"({"id":1e400,"op":"ping"})",
            R"({"id":1,"op":"subscribe","topic":"../../etc"})",
            R"({"id":1,"op":"book","resource":"room-10","quantity":18446744073709551615})",
            R"({"id":1,"op":"book","lines":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]})",
            "\xff\xfe invalid utf-8"};
        raw.send(test::ws_frame(texts[rng() % 6]));
        break;
      }
    }
    raw.receive(std::chrono::milliseconds(rng() % 20));
  }
  // Still serving: a well-behaved client books.
  auto ws = s.ws("alice");
  auto reply = ws->request(book("room-10")).value();
  CHECK(reply.at("ok") == true);
  CHECK(s.http().request("GET", "/healthz").value().status == 200);
}

TEST_CASE("HTTP requests are rate limited per user, across connections (429 with Retry-After)") {
  GatewayOptions o;
  o.user_rate_limit_per_second = 0.05;  // one request each 20 s after the burst: the test takes far less
  o.user_rate_limit_burst = 5;
  Server s(o);
  const auto alice = Server::token("alice");
  auto get = [&](const std::string& token) {
    // A new connection each time: the limit is the user's, not the connection's.
    auto http = s.http();
    return http.request("GET", "/v1/whoami", {}, {{"Authorization", "Bearer " + token}}).value();
  };
  for (int i = 0; i < 5; ++i) CHECK(get(alice).status == 200);
  auto refused = get(alice);
  CHECK(refused.status == 429);
  CHECK(refused.json().at("error").at("code") == "rate_limited");
  const auto retry_after = std::stoi(refused.header("retry-after"));
  CHECK(retry_after >= 1);
  CHECK(retry_after <= 20);
  // POST /v1/bookings is counted too.
  auto http = s.http();
  auto post = http.request("POST", "/v1/bookings", R"({"resource":"hall"})",
                           {{"Authorization", "Bearer " + alice}, {"Content-Type", "application/json"}})
                  .value();
  CHECK(post.status == 429);
  // Another user is not affected; requests without a verified identity are not counted.
  CHECK(get(Server::token("bob")).status == 200);
  CHECK(s.http().request("GET", "/healthz").value().status == 200);
  CHECK(s.gateway->stats().user_rate_limited == 2);
  CHECK(s.http().request("GET", "/metrics").value().body.find("pushbook_user_rate_limited_total 2\n") !=
        std::string::npos);
}

TEST_CASE("the access log: a line per HTTP request and per WebSocket and SSE session, never a token") {
  GatewayOptions o;
  o.access_log = true;
  Server s(o);
  const auto token = Server::token("alice");
  auto http = s.http();
  // The token in the query string must not reach the log.
  auto r = http.request("POST", "/v1/bookings?access_token=" + token, R"({"resource":"hall"})",
                        {{"Content-Type", "application/json"}})
               .value();
  REQUIRE(r.status == 202);
  CHECK(http.request("GET", "/v1/nowhere").value().status == 404);
  {
    auto ws = s.ws("bob");
    REQUIRE(ws->request(book("room-10")).value().at("ok") == true);
    ws->close();
  }
  auto access_lines = [&] {
    std::lock_guard lock(s.log_mutex);
    std::vector<std::string> out;
    for (const auto& line : s.info_lines)
      if (line.starts_with("access ")) out.push_back(line);
    return out;
  };
  REQUIRE(test::eventually([&] { return access_lines().size() >= 3; }));
  const auto lines = access_lines();
  REQUIRE(lines.size() == 3);
  for (const auto& line : lines) CHECK(line.find(token) == std::string::npos);
  // A request's line is written once its response is, which the client may see first: the
  // lines of different connections come in any order.
  auto with = [&](std::string_view prefix) {
    for (const auto& line : lines)
      if (line.starts_with(prefix)) return line;
    return std::string();
  };
  const auto post = with("access http user=alice peer=127.0.0.1:");
  CHECK(post.find(" method=POST route=/v1/bookings status=202 bytes=") != std::string::npos);
  CHECK(post.find(" ms=") != std::string::npos);
  CHECK(with("access http user=- peer=127.0.0.1:").find(" method=GET route=other status=404 ") !=
        std::string::npos);
  CHECK(with("access ws user=bob peer=127.0.0.1:").find(" route=/v1/ws close=1000 by=client in=1 ") !=
        std::string::npos);
}

TEST_CASE("no access log unless asked") {
  Server s;
  auto ws = s.ws("alice");
  REQUIRE(ws->request(book("room-10")).value().at("ok") == true);
  CHECK(s.http().request("GET", "/healthz").value().status == 200);
  ws.reset();
  s.gateway->stop();  // every session has ended, and would have logged its line
  std::lock_guard lock(s.log_mutex);
  CHECK_FALSE(s.log_lines.empty());
  for (const auto& line : s.log_lines) CHECK_FALSE(line.starts_with("access "));
}

TEST_CASE("/metrics tells the file-descriptor limit and accept failures") {
  Server s;
  auto body = s.http().request("GET", "/metrics").value().body;
  CHECK(body.find("pushbook_fd_limit ") != std::string::npos);
  CHECK(body.find("pushbook_accept_failures_total 0\n") != std::string::npos);
  CHECK(body.find("pushbook_accept_paused 0\n") != std::string::npos);
}

namespace {
// A MemoryStore that says whether it can take changes as the test decides (as PostgresStore
// does while its database is away).
struct SwitchableStore final : BookingStore {
  MemoryStore inner;
  std::atomic<bool> up{true};
  result<void> commit(const StateChange& change) override { return inner.commit(change); }
  result<std::optional<Booking>> load(std::string_view id) const override { return inner.load(id); }
  result<void> put_resource(std::string_view id, std::uint32_t capacity) override {
    return inner.put_resource(id, capacity);
  }
  result<RecoveredState> recover(wall_clock::time_point since) override { return inner.recover(since); }
  bool available() const noexcept override { return up.load(); }
};
}  // namespace

TEST_CASE("/healthz: 503 'degraded' while the store cannot take changes, 200 once it can again") {
  auto store = std::make_shared<SwitchableStore>();
  EngineOptions eo;
  eo.store = store;
  Server s({}, eo);
  auto http = s.http();
  CHECK(http.request("GET", "/healthz").value().body == R"({"status":"ok","store":"up","bus":"up"})");
  store->up = false;
  auto down = http.request("GET", "/healthz").value();
  CHECK(down.status == 503);
  CHECK(down.body == R"({"status":"degraded","store":"down","bus":"up"})");
  store->up = true;
  auto again = http.request("GET", "/healthz").value();
  CHECK(again.status == 200);
  CHECK(again.body == R"({"status":"ok","store":"up","bus":"up"})");
}

namespace {
// A LocalBus that says whether it is reachable as the test decides (as RedisBus does while
// Redis is away).
struct SwitchableBus final : EventBus {
  LocalBus inner;
  std::atomic<bool> up{true};
  using EventBus::publish;
  result<EventPtr> publish(std::string_view topic, std::shared_ptr<const boost::json::value> data,
                           const PublishOptions& o) override {
    return inner.publish(topic, std::move(data), o);
  }
  result<Subscription> subscribe(std::string_view topic, DeliveryCallback cb, SubscribeOptions o) override {
    return inner.subscribe(topic, std::move(cb), std::move(o));
  }
  EventPtr last(std::string_view topic) const override { return inner.last(topic); }
  std::vector<EventPtr> history(std::string_view topic, std::uint64_t since_seq) const override {
    return inner.history(topic, since_seq);
  }
  bool available() const noexcept override { return up.load(); }
};
}  // namespace

TEST_CASE("/healthz: 503 'degraded' while the bus is unreachable; node_name names the node in every answer") {
  auto bus = std::make_shared<SwitchableBus>();
  auto engine = std::make_shared<BookingEngine>(bus);
  engine->add_resource("hall", 10).value();
  GatewayOptions o;
  o.secret = secret;
  o.threads = 1;
  o.node_name = "node-7";
  o.log = [](LogLevel, std::string_view) {};
  PushGateway gateway(bus, engine, o);
  const auto port = gateway.listen().value();
  client::HttpClient http("127.0.0.1", port);

  auto ok = http.request("GET", "/healthz").value();
  CHECK(ok.status == 200);
  CHECK(ok.body == R"({"status":"ok","store":"up","bus":"up","node":"node-7"})");
  CHECK(ok.header("pushbook-node") == "node-7");
  bus->up = false;
  auto down = http.request("GET", "/healthz").value();
  CHECK(down.status == 503);
  CHECK(down.body == R"({"status":"degraded","store":"up","bus":"down","node":"node-7"})");
  bus->up = true;
  CHECK(http.request("GET", "/healthz").value().status == 200);
  // Every answer says which node gave it: errors, the WebSocket handshake, an SSE stream.
  CHECK(http.request("GET", "/v1/nothing").value().header("pushbook-node") == "node-7");
  const auto token = Server::token("alice");
  RawSocket ws(port);
  REQUIRE(ws.send(test::ws_upgrade_request(token)));
  const auto head = ws.receive_until("\r\n\r\n", 5s);
  CHECK(head.starts_with("HTTP/1.1 101"));
  CHECK(head.find("Pushbook-Node: node-7\r\n") != std::string::npos);
  RawSocket sse(port);
  REQUIRE(sse.send("GET /v1/events?topic=user/alice HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                   "\r\n\r\n"));
  const auto sse_head = sse.receive_until("\r\n\r\n", 5s);
  CHECK(sse_head.starts_with("HTTP/1.1 200"));
  CHECK(sse_head.find("Pushbook-Node: node-7\r\n") != std::string::npos);
  gateway.stop();

  // A name that could break a header is refused.
  o.node_name = "node\r\nX-Evil: 1";
  CHECK_THROWS_AS(PushGateway(bus, engine, o), Exception);
  o.node_name = std::string(65, 'n');
  CHECK_THROWS_AS(PushGateway(bus, engine, o), Exception);
}

// --- RFC 6455 on the wire --------------------------------------------------------------------
// Plain-TCP WebSockets are served by the gateway's own frame layer (src/gateway/ws_frame.hpp);
// with permessage_deflate on, by Beast's websocket::stream. Each case runs against both: the
// client cannot tell them apart.

namespace {

struct ServerFrame {
  std::uint8_t opcode = 0;
  bool fin = false;
  std::string payload;
};

/// Splits what a server sent into frames (unmasked, as servers send them); stops at an incomplete one.
std::vector<ServerFrame> server_frames(std::string_view bytes) {
  std::vector<ServerFrame> out;
  while (bytes.size() >= 2) {
    const auto b0 = static_cast<unsigned char>(bytes[0]);
    const auto b1 = static_cast<unsigned char>(bytes[1]);
    REQUIRE((b1 & 0x80) == 0);  // a server never masks
    std::size_t len = b1 & 0x7f, header = 2;
    if (len == 126) {
      if (bytes.size() < 4) break;
      len = (static_cast<unsigned char>(bytes[2]) << 8) | static_cast<unsigned char>(bytes[3]);
      header = 4;
    } else if (len == 127) {
      if (bytes.size() < 10) break;
      len = 0;
      for (int i = 2; i < 10; ++i) len = (len << 8) | static_cast<unsigned char>(bytes[i]);
      header = 10;
    }
    if (bytes.size() < header + len) break;
    out.push_back(
        {static_cast<std::uint8_t>(b0 & 0x0f), (b0 & 0x80) != 0, std::string(bytes.substr(header, len))});
    bytes.remove_prefix(header + len);
  }
  return out;
}

/// Reads until the server's close frame (and returns its code) or `timeout`; 0 when none came.
std::uint16_t close_code_from(RawSocket& raw, std::string already, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::string all = std::move(already);
  while (true) {
    for (const auto& f : server_frames(all))
      if (f.opcode == 0x8)
        return f.payload.size() >= 2
                   ? static_cast<std::uint16_t>((static_cast<unsigned char>(f.payload[0]) << 8) |
                                                static_cast<unsigned char>(f.payload[1]))
                   : 1005;
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0 || raw.closed()) return 0;
    all += raw.receive(left);
  }
}

/// Upgrades `raw`; returns what came after the 101's head.
std::string upgrade(RawSocket& raw, std::string request) {
  REQUIRE(raw.send(request));
  auto head = raw.receive_until("\r\n\r\n", 5s);
  REQUIRE(head.starts_with("HTTP/1.1 101"));
  return head.substr(head.find("\r\n\r\n") + 4);
}

}  // namespace

TEST_CASE(
    "RFC 6455 on the wire: accept key, pings answered with their payload, a client's close echoed, then "
    "FIN") {
  for (const bool beast : {false, true}) {
    CAPTURE(beast);
    GatewayOptions o;
    o.permessage_deflate = beast;
    Server s(o);
    RawSocket raw(s.port);
    REQUIRE(raw.send(test::ws_upgrade_request(Server::token("alice"))));
    const auto head = raw.receive_until("\r\n\r\n", 5s);
    REQUIRE(head.starts_with("HTTP/1.1 101"));
    CHECK(head.find("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n") != std::string::npos);
    REQUIRE(raw.send(test::ws_frame("are you there", 0x9)));
    auto got = raw.receive_until("are you there", 5s);
    auto frames = server_frames(got);
    REQUIRE(frames.size() == 1);
    CHECK(frames[0].opcode == 0xA);
    CHECK(frames[0].payload == "are you there");
    // A request and a close right behind it: the reply may come, then the echoed close and FIN.
    REQUIRE(raw.send(test::ws_frame(R"({"id":7,"op":"ping"})") + test::ws_frame("\x0f\xa0", 0x8)));  // 4000
    CHECK(close_code_from(raw, "", 5s) == 4000);
    CHECK(raw.wait_closed(5s));
  }
}

TEST_CASE("RFC 6455 violations close the connection with the code the RFC names; other clients carry on") {
  for (const bool beast : {false, true}) {
    CAPTURE(beast);
    GatewayOptions o;
    o.permessage_deflate = beast;
    o.max_message_bytes = 4096;
    Server s(o);
    auto bystander = s.ws("bob");
    auto violation = [&](const std::string& frame) {
      RawSocket raw(s.port);
      auto after = upgrade(raw, test::ws_upgrade_request(Server::token("alice")));
      REQUIRE(raw.send(frame));
      const auto code = close_code_from(raw, after, 5s);
      CHECK(raw.wait_closed(5s));
      return code;
    };
    CHECK(violation("\x81\x02hi") == 1002);                                // not masked
    CHECK(violation(test::ws_frame("x", 0x3)) == 1002);                    // reserved opcode
    CHECK(violation(test::ws_frame("x", 0x0)) == 1002);                    // continuation of nothing
    CHECK(violation(test::ws_frame(std::string(126, 'p'), 0x9)) == 1002);  // control frame too big
    CHECK(violation(test::ws_frame("{\"op\":\"\xc3\x28\"}")) == 1007);     // not UTF-8
    CHECK(violation(test::ws_frame(std::string(5000, ' '))) == 1009);      // over max_message_bytes
    CHECK(violation(test::ws_frame(std::string(3000, ' '), 0x1, false) +
                    test::ws_frame(std::string(3000, ' '), 0x0)) == 1009);  // over it in fragments
    CHECK(bystander->request({{"op", "ping"}}).value().at("ok") == true);
  }
}

TEST_CASE("an upgrade RFC 6455 does not allow is refused with 400, another version with 426") {
  for (const bool beast : {false, true}) {
    CAPTURE(beast);
    GatewayOptions o;
    o.permessage_deflate = beast;
    Server s(o);
    auto status_of = [&](const std::string& request) {
      RawSocket raw(s.port);
      REQUIRE(raw.send(request));
      auto head = raw.receive_until("\r\n\r\n", 5s);
      return head;
    };
    auto request = test::ws_upgrade_request(Server::token("alice"));
    auto replace = [&](std::string_view from, std::string_view to) {
      auto r = request;
      r.replace(r.find(from), from.size(), to);
      return r;
    };
    const auto v8 = status_of(replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"));
    CHECK(v8.starts_with("HTTP/1.1 426"));
    CHECK(v8.find("Sec-WebSocket-Version: 13") != std::string::npos);
    CHECK(status_of(replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""))
              .starts_with("HTTP/1.1 400"));
    // A key that is not base64 of 16 bytes (Beast's stream only bounds the key's length).
    if (!beast) CHECK(status_of(replace("dGhlIHNhbXBsZSBub25jZQ==", "short")).starts_with("HTTP/1.1 400"));
    // The connection is still good for a proper upgrade afterwards.
    CHECK(s.ws("carol")->request({{"op", "ping"}}).value().at("ok") == true);
  }
}

TEST_CASE("stop() sends 1001 and cuts a client that never answers the close after handshake_timeout") {
  GatewayOptions o;
  o.handshake_timeout = 500ms;  // bounds the wait for the client's close frame
  Server s(o);
  RawSocket raw(s.port);
  auto after = upgrade(raw, test::ws_upgrade_request(Server::token("alice")));
  REQUIRE(raw.send(test::ws_frame(R"({"id":1,"op":"subscribe","topic":"user/alice"})")));
  after += raw.receive_until(R"("id":1)", 5s);
  s.gateway->stop();  // 1001 to every WebSocket; this client never answers it: cut after 500 ms
  CHECK(close_code_from(raw, after, 5s) == 1001);
  CHECK(raw.wait_closed(5s));
}

TEST_CASE(
    "requests are read whole however TCP cuts them: over the first read, exactly it, many at once, a byte at "
    "a time") {
  for (const bool beast : {false, true}) {
    CAPTURE(beast);
    GatewayOptions o;
    o.permessage_deflate = beast;
    Server s(o);
    RawSocket raw(s.port);
    std::string got = upgrade(raw, test::ws_upgrade_request(Server::token("alice")));
    // Reads on until the pong for request `id` came, and says whether it did.
    auto replied = [&](int id) {
      const auto needle = fmt::format(R"("id":{},"ok":true,"result":{{"pong":true)", id);
      if (got.find(needle) == std::string::npos) got += raw.receive_until(needle, 5s);
      return got.find(needle) != std::string::npos;
    };
    // A ping padded with a field the gateway ignores.
    auto ping = [](int id, std::size_t pad = 0) {
      return test::ws_frame(fmt::format(R"({{"id":{},"op":"ping","pad":"{}"}})", id, std::string(pad, 'x')));
    };
    // Larger than what the raw layer reads first (128 bytes): the rest is read behind it.
    REQUIRE(ping(1, 300).size() > 300);
    REQUIRE(raw.send(ping(1, 300)));
    CHECK(replied(1));
    // A frame of exactly 128 bytes (6 bytes of header and mask, a 122-byte payload), then another
    // request once it is answered.
    REQUIRE(ping(2, 93).size() == 128);
    REQUIRE(raw.send(ping(2, 93)));
    CHECK(replied(2));
    REQUIRE(raw.send(ping(3)));
    CHECK(replied(3));
    // Twenty requests in one write, answered in order.
    std::string batch;
    for (int id = 100; id < 120; ++id) batch += ping(id);
    REQUIRE(raw.send(batch));
    REQUIRE(replied(119));
    std::size_t at = 0;
    for (int id = 100; id < 120; ++id) {
      const auto next = got.find(fmt::format(R"("id":{},)", id), at);
      REQUIRE(next != std::string::npos);
      at = next;
    }
    // One byte per write.
    for (const char c : ping(4, 200)) REQUIRE(raw.send(std::string(1, c)));
    CHECK(replied(4));
  }
}
