// Hosts with their own Asio/Beast server: the gateway on the host's io_context, and requests
// the host read itself handed to the gateway (pushbook/beast.hpp).
#include <pushbook/auth.hpp>
#include <pushbook/beast.hpp>
#include <pushbook/client.hpp>
#include <pushbook/push_gateway.hpp>

#include <doctest/doctest.h>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

namespace {
const char* secret = "k";
std::string token(const std::string& user) {
  return sign_token(user, std::chrono::system_clock::now() + 1h, secret);
}
}  // namespace

TEST_CASE("the gateway runs on the host's io_context and threads") {
  net::io_context ioc;
  auto guard = net::make_work_guard(ioc);
  std::vector<std::thread> threads;
  for (int i = 0; i < 2; ++i) threads.emplace_back([&] { ioc.run(); });
  {
    auto bus = std::make_shared<LocalBus>();
    auto engine = std::make_shared<BookingEngine>(bus);
    engine->add_resource("r", 3).value();
    GatewayOptions o;
    o.secret = secret;
    o.log = [](LogLevel, std::string_view) {};
    PushGateway gw(bus, engine, o, ioc);
    const auto port = gw.listen().value();
    client::ConnectOptions c;
    c.port = port;
    c.token = token("alice");
    auto ws = client::WsClient::connect(c).value();
    auto reply = ws->request({{"op", "book"}, {"resource", "r"}}).value();
    CHECK(reply.at("ok") == true);
    // Several clients at once on the host's two threads (each connection on a strand of the
    // host's io_context): every request answered, every decision pushed.
    std::vector<std::thread> clients;
    std::atomic<int> answered{0}, decided{0};
    for (int i = 0; i < 6; ++i)
      clients.emplace_back([&, i] {
        client::ConnectOptions ci = c;
        ci.token = token("user" + std::to_string(i));
        auto w = client::WsClient::connect(ci).value();
        for (int n = 0; n < 50; ++n)
          if (w->request({{"op", "ping"}}).value().at("ok") == true) answered.fetch_add(1);
        auto booked = w->request({{"op", "book"}, {"resource", "r"}}).value();
        if (booked.at("ok") == true && w->next(5s)) decided.fetch_add(1);
      });
    for (auto& t : clients) t.join();
    CHECK(answered.load() == 300);
    CHECK(decided.load() == 6);
    ws.reset();
    gw.stop();  // from a thread that does not run the io_context
  }
  guard.reset();
  for (auto& t : threads) t.join();
}

TEST_CASE("a host's Beast server hands /v1/ requests, upgrades included, to the gateway") {
  auto bus = std::make_shared<LocalBus>();
  auto engine = std::make_shared<BookingEngine>(bus);
  engine->add_resource("r", 3).value();
  GatewayOptions o;
  o.secret = secret;
  o.threads = 1;
  o.log = [](LogLevel, std::string_view) {};
  PushGateway gw(bus, engine, o);  // no listen(): the host owns the port

  net::io_context host;
  tcp::acceptor acceptor(host, tcp::endpoint(net::ip::make_address("127.0.0.1"), 0));
  const auto port = acceptor.local_endpoint().port();
  std::thread server([&] {
    for (int i = 0; i < 2; ++i) {  // serves two connections, then stops
      beast::tcp_stream stream(acceptor.accept(net::make_strand(host)));
      beast::flat_buffer buffer;
      http::request<http::string_body> req;
      http::read(stream, buffer, req);
      if (req.target().starts_with("/v1/")) {
        serve_request(gw, std::move(stream), std::move(req));
        continue;
      }
      http::response<http::string_body> res{http::status::ok, req.version()};
      res.body() = "host page";
      res.prepare_payload();
      http::write(stream, res);
    }
  });

  client::HttpClient http_client("127.0.0.1", port);
  auto page = http_client.request("GET", "/").value();
  CHECK(page.body == "host page");

  client::ConnectOptions c;
  c.port = port;
  c.token = token("alice");
  auto ws = client::WsClient::connect(c).value();
  auto reply = ws->request({{"op", "book"}, {"resource", "r"}}).value();
  CHECK(reply.at("ok") == true);
  auto ev = ws->next(5s);
  REQUIRE(ev.has_value());
  CHECK(ev->at("type") == "event");
  server.join();
  ws.reset();
  gw.stop();
}
