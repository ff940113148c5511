// The gateway over TLS: https, wss and SSE; one port for plain and TLS or TLS only; reloads;
// mutual TLS; and every kind of bad TLS input, each followed by a connection that still works.
// Certificates are made at run time (tests/tls_probe.hpp).
#include <pushbook/auth.hpp>
#include <pushbook/beast_ssl.hpp>
#include <pushbook/client.hpp>
#include <pushbook/push_gateway.hpp>

#include "raw_socket.hpp"
#include "tls_probe.hpp"
#include "wait.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <boost/asio/strand.hpp>
#include <boost/beast/http.hpp>

#include <filesystem>
#include <mutex>
#include <thread>

using namespace pushbook;
using namespace std::chrono_literals;
using test::TestCerts;
using test::TlsProbe;

namespace {

constexpr const char* secret = "tls-test-secret";

std::string token(const std::string& user) {
  return sign_token(user, std::chrono::system_clock::now() + 1h, secret);
}

TlsOptions server_tls(const TestCerts& certs, bool tls_only = true) {
  TlsOptions t;
  t.cert_file = certs.file("server.pem");
  t.key_file = certs.file("server.key");
  t.tls_only = tls_only;
  return t;
}

struct Server {
  std::mutex log_mutex;  // first: the gateway logs while it stops
  std::vector<std::string> log_lines;
  std::shared_ptr<LocalBus> bus = std::make_shared<LocalBus>();
  std::shared_ptr<BookingEngine> engine = std::make_shared<BookingEngine>(bus);
  std::unique_ptr<PushGateway> gateway;
  std::uint16_t port = 0;

  explicit Server(TlsOptions tls, GatewayOptions o = {}) {
    engine->add_resource("room", 5).value();
    o.secret = secret;
    o.threads = 2;
    o.tls = std::move(tls);
    o.log = [this](LogLevel, std::string_view line) {
      std::lock_guard lock(log_mutex);
      log_lines.emplace_back(line);
    };
    gateway = std::make_unique<PushGateway>(bus, engine, std::move(o));
    port = gateway->listen().value();
  }

  client::TlsClientOptions client_tls() const {
    client::TlsClientOptions t;
    t.enabled = true;
    t.ca_file = TestCerts::shared().file("ca.pem");
    return t;
  }

  client::ConnectOptions ws_options(const std::string& user) const {
    client::ConnectOptions c;
    c.port = port;
    c.token = token(user);
    c.tls = client_tls();
    return c;
  }

  // A WSS client books one unit and returns the decision pushed to it.
  std::string book_over_wss(const std::string& user) const {
    auto ws = client::WsClient::connect(ws_options(user));
    if (!ws) return "connect failed: " + ws.error().message;
    auto ack = (*ws)->request({{"op", "book"}, {"resource", "room"}});
    if (!ack || ack->at("ok") != true) return "no ack";
    for (int i = 0; i < 10; ++i) {
      auto ev = (*ws)->next(5s);
      if (!ev) return "no decision";
      if (ev->at("type") != "event") continue;
      const auto status = std::string(ev->at("data").at("status").as_string());
      if (status != "processing") return status;
    }
    return "none";
  }

  std::uint64_t metric(std::string_view name) const {
    const auto text = gateway->metrics_text();
    const auto at = text.find(fmt::format("\n{} ", name));
    if (at == std::string::npos) return 0;
    return std::stoull(text.substr(at + name.size() + 2));
  }
};

}  // namespace

TEST_CASE("https, wss and SSE over TLS: book, get the decision pushed, follow it as an event stream") {
  const auto& certs = TestCerts::shared();
  Server s(server_tls(certs));
  CHECK(s.gateway->tls_enabled());

  client::HttpClient https("127.0.0.1", s.port, 5s, s.client_tls());
  auto health = https.request("GET", "/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
  // Keep-alive over TLS: the second request goes on the same connection.
  REQUIRE(https.request("GET", "/healthz"));
  CHECK(s.metric("pushbook_tls_handshakes_total") == 1);

  CHECK(s.book_over_wss("alice") == "confirmed");

  // SSE over TLS: a booking made over https, then its stream from the start.
  auto made = https.request("POST", "/v1/bookings", R"({"resource":"room","quantity":1})",
                            {{"Authorization", "Bearer " + token("bob")}});
  REQUIRE(made);
  REQUIRE(made->status == 202);
  const auto id = std::string(made->json().at("booking_id").as_string());
  TlsProbe sse(s.port, test::probe(certs.file("ca.pem"), {}, {"http/1.1"}));
  REQUIRE(sse.ok());
  CHECK(sse.alpn() == "http/1.1");
  REQUIRE(sse.write(fmt::format("GET /v1/events?topic=booking/{}&access_token={} HTTP/1.1\r\nHost: x\r\n\r\n",
                                id, token("bob"))));
  const auto stream = sse.read_until(R"("status":"confirmed")");
  CHECK(stream.starts_with("HTTP/1.1 200"));
  CHECK(stream.find("text/event-stream") != std::string::npos);
  CHECK(stream.find(R"("status":"confirmed")") != std::string::npos);
}

TEST_CASE("one port for plain and TLS: told apart by the first bytes") {
  const auto& certs = TestCerts::shared();
  Server s(server_tls(certs, false));
  client::HttpClient plain("127.0.0.1", s.port);
  client::HttpClient tls("127.0.0.1", s.port, 5s, s.client_tls());
  auto a = plain.request("GET", "/healthz");
  auto b = tls.request("GET", "/healthz");
  REQUIRE(a);
  REQUIRE(b);
  CHECK(a->status == 200);
  CHECK(b->status == 200);
  // A WebSocket of each kind.
  auto ws_plain_options = s.ws_options("carol");
  ws_plain_options.tls = {};
  auto ws_plain = client::WsClient::connect(ws_plain_options);
  REQUIRE(ws_plain);
  CHECK((*ws_plain)->request({{"op", "ping"}}).value().at("ok") == true);
  CHECK(s.book_over_wss("dave") == "confirmed");
  // A plain request whose first bytes the detection had to read is served whole.
  test::RawSocket raw(s.port);
  REQUIRE(raw.send("GET /hea"));
  REQUIRE(raw.send("lthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
  CHECK(raw.receive_until("\r\n\r\n", 5s).starts_with("HTTP/1.1 200"));
}

TEST_CASE("a TLS-only port: plain HTTP is told to use https, other plain bytes are closed on") {
  const auto& certs = TestCerts::shared();
  Server s(server_tls(certs));
  {
    test::RawSocket raw(s.port);
    REQUIRE(raw.send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
    const auto answer = raw.receive_until("use https", 5s);
    CHECK(answer.starts_with("HTTP/1.1 400"));
    CHECK(answer.find("TLS only") != std::string::npos);
    raw.receive_until("never", 5s);
    CHECK(raw.closed());
  }
  {
    test::RawSocket raw(s.port);
    REQUIRE(raw.send(std::string("\x01\x02\x03garbage", 10)));
    CHECK(raw.receive_until("never", 5s).empty());
    CHECK(raw.closed());
  }
  CHECK(s.metric("pushbook_tls_plain_refused_total") == 2);
  CHECK(s.book_over_wss("erin") == "confirmed");
}

TEST_CASE("bad TLS input never harms the gateway") {
  const auto& certs = TestCerts::shared();
  GatewayOptions o;
  o.handshake_timeout = 300ms;
  Server s(server_tls(certs), o);

  SUBCASE("garbage that starts like a TLS record: the handshake fails, the connection is closed") {
    test::RawSocket raw(s.port);
    // A handshake record holding a ClientHello by its header (type and sizes), then bytes no
    // ClientHello has.
    REQUIRE(raw.send(std::string("\x16\x03\x01\x00\x40\x01\x00\x00\x3c", 9) + std::string(60, '\xee')));
    raw.receive_until("never", 5s);
    CHECK(raw.closed());
    CHECK(test::eventually([&] { return s.metric("pushbook_tls_handshake_failures_total") == 1; }));
  }
  SUBCASE("a handshake that stalls is cut at handshake_timeout") {
    test::RawSocket raw(s.port);
    REQUIRE(raw.send(std::string("\x16\x03\x01\x02\x00\x01", 6)));  // a ClientHello's first bytes, no more
    const auto start = std::chrono::steady_clock::now();
    raw.receive_until("never", 5s);
    CHECK(raw.closed());
    CHECK(std::chrono::steady_clock::now() - start < 4s);
  }
  SUBCASE("a client that connects and says nothing is cut at handshake_timeout too") {
    test::RawSocket raw(s.port);
    raw.receive_until("never", 5s);
    CHECK(raw.closed());
  }
  SUBCASE("clients that go away mid-handshake: each counted as a failed handshake, none left open") {
    for (int i = 0; i < 20; ++i) {
      test::RawSocket raw(s.port);
      REQUIRE(raw.send(std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11)));
    }  // closed at once
    CHECK(test::eventually([&] { return s.metric("pushbook_tls_handshake_failures_total") == 20; }));
  }
  SUBCASE("a wrong SNI: the gateway has one certificate and presents it (the client's check fails)") {
    TlsProbe unchecked(s.port, test::probe({}, "wrong.example"));
    REQUIRE(unchecked.ok());
    CHECK(unchecked.peer_common_name() == "localhost");
    TlsProbe checked(s.port, test::probe(certs.file("ca.pem"), "wrong.example"));
    CHECK_FALSE(checked.ok());
    // pushbook's client refuses the same way, with the reason.
    auto options = s.ws_options("frank");
    options.tls.server_name = "wrong.example";
    auto ws = client::WsClient::connect(options);
    REQUIRE_FALSE(ws);
    CHECK(ws.error().message.find("TLS handshake") != std::string::npos);
  }
  SUBCASE("ALPN: http/1.1 is chosen; a client offering only h2 gets no ALPN answer and is served") {
    TlsProbe both(s.port, test::probe({}, {}, {"h2", "http/1.1"}));
    REQUIRE(both.ok());
    CHECK(both.alpn() == "http/1.1");
    TlsProbe h2(s.port, test::probe({}, {}, {"h2"}));
    REQUIRE(h2.ok());
    CHECK(h2.alpn().empty());
    REQUIRE(h2.write("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    CHECK(h2.read_until("\r\n\r\n").starts_with("HTTP/1.1 200"));
  }
  SUBCASE("TLS 1.2 at least: a TLS 1.1 client is refused, a TLS 1.2 one served") {
    auto old_client = test::probe();
    old_client.max_version = TLS1_1_VERSION;
    TlsProbe old_probe(s.port, old_client);
    CHECK_FALSE(old_probe.ok());
    auto tls12 = test::probe();
    tls12.max_version = TLS1_2_VERSION;
    TlsProbe probe(s.port, tls12);
    REQUIRE(probe.ok());
    CHECK(probe.version() == "TLSv1.2");
    CHECK(TlsProbe(s.port).version() == "TLSv1.3");
  }
  // Whatever came before, the gateway still serves.
  CHECK(s.book_over_wss("grace") == "confirmed");
}

TEST_CASE("connections that end in the TLS step give their place back (max_connections)") {
  GatewayOptions o;
  o.max_connections = 3;
  Server s(server_tls(TestCerts::shared()), o);
  for (int i = 0; i < 10; ++i) {
    test::RawSocket raw(s.port);
    REQUIRE(raw.send(std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11)));
  }
  for (int i = 0; i < 10; ++i) {
    test::RawSocket raw(s.port);
    REQUIRE(raw.send("GET / HTTP/1.1\r\n\r\n"));  // plain, refused
    raw.receive_until("never", 5s);
  }
  CHECK(test::eventually([&] { return s.metric("pushbook_tls_handshake_failures_total") == 10; }));
  // Were any of them still counted, a new connection would get 503 (at most 3 open).
  client::HttpClient https("127.0.0.1", s.port, 5s, s.client_tls());
  CHECK(test::eventually([&] {
    auto r = https.request("GET", "/healthz");
    return r && r->status == 200;
  }));
  CHECK(s.book_over_wss("mallory") == "confirmed");
}

TEST_CASE("stop() with TLS connections open: WSS clients get 1001, keep-alive and half-done handshakes end") {
  GatewayOptions o;
  o.shutdown_timeout = 3s;
  Server s(server_tls(TestCerts::shared()), o);
  auto ws = client::WsClient::connect(s.ws_options("nina")).value();
  REQUIRE(ws->request({{"op", "ping"}}));
  client::HttpClient https("127.0.0.1", s.port, 5s, s.client_tls());
  REQUIRE(https.request("GET", "/healthz"));  // an idle keep-alive connection from now on
  test::RawSocket half(s.port);
  REQUIRE(half.send(std::string("\x16\x03\x01\x02\x00\x01", 6)));  // a handshake never finished
  REQUIRE(test::eventually([&] { return s.gateway->stats().connections_total >= 3; }));
  const auto start = std::chrono::steady_clock::now();
  s.gateway->stop();
  // Every connection was found and ended: nothing waited for the shutdown timeout.
  CHECK(std::chrono::steady_clock::now() - start < 3s);
  auto closed = ws->wait_closed(5s);
  REQUIRE(closed);
  CHECK(closed->code == 1001);
  half.receive_until("never", 5s);
  CHECK(half.closed());
}

TEST_CASE("a certificate and key that do not match, or files that cannot be read: no start, a clear error") {
  const auto& certs = TestCerts::shared();
  auto start = [](TlsOptions tls) -> std::string {
    GatewayOptions o;
    o.secret = secret;
    o.tls = std::move(tls);
    o.log = [](LogLevel, std::string_view) {};
    auto bus = std::make_shared<LocalBus>();
    try {
      PushGateway g(bus, std::make_shared<BookingEngine>(bus), o);
      return "started";
    } catch (const Exception& e) {
      CHECK(e.code() == make_error_code(errc::bad_request));
      return e.what();
    }
  };
  auto tls = server_tls(certs);
  tls.key_file = certs.file("other.key");
  CHECK(start(tls).find("does not match") != std::string::npos);
  tls = server_tls(certs);
  tls.cert_file = certs.file("missing.pem");
  CHECK(start(tls).find("cannot be read") != std::string::npos);
  tls = server_tls(certs);
  tls.key_file.clear();
  CHECK(start(tls).find("both") != std::string::npos);
  tls = server_tls(certs);
  tls.cert_file = certs.file("server.key");  // a key where the certificate should be
  CHECK(start(tls).find("certificate file") != std::string::npos);
  CHECK(start(server_tls(certs)) == "started");
}

TEST_CASE("reload_tls: new handshakes get the new certificate, open connections go on") {
  const auto& certs = TestCerts::shared();
  test::TempDir live("pushbook-live-certs");
  namespace fs = std::filesystem;
  fs::copy_file(certs.file("server.pem"), live.file("cert.pem"));
  fs::copy_file(certs.file("server.key"), live.file("key.pem"));
  TlsOptions tls;
  tls.cert_file = live.file("cert.pem");
  tls.key_file = live.file("key.pem");
  tls.tls_only = true;
  Server s(tls);
  auto old_ws = client::WsClient::connect(s.ws_options("heidi")).value();
  CHECK(TlsProbe(s.port).peer_common_name() == "localhost");

  fs::copy_file(certs.file("server2.pem"), live.file("cert.pem"), fs::copy_options::overwrite_existing);
  fs::copy_file(certs.file("server2.key"), live.file("key.pem"), fs::copy_options::overwrite_existing);
  REQUIRE(s.gateway->reload_tls());
  CHECK(TlsProbe(s.port).peer_common_name() == "localhost (renewed)");
  CHECK(old_ws->request({{"op", "ping"}}).value().at("ok") == true);

  // A bad renewal (a key of another certificate): refused, the renewed certificate stays.
  fs::copy_file(certs.file("other.key"), live.file("key.pem"), fs::copy_options::overwrite_existing);
  auto bad = s.gateway->reload_tls();
  REQUIRE_FALSE(bad);
  CHECK(bad.error().message.find("does not match") != std::string::npos);
  CHECK(TlsProbe(s.port).peer_common_name() == "localhost (renewed)");
  const auto text = s.gateway->metrics_text();
  CHECK(text.find(R"(pushbook_tls_reloads_total{result="ok"} 1)") != std::string::npos);
  CHECK(text.find(R"(pushbook_tls_reloads_total{result="failed"} 1)") != std::string::npos);
  CHECK(s.book_over_wss("ivan") == "confirmed");

  // Without TLS there is nothing to reload.
  GatewayOptions plain;
  plain.secret = secret;
  plain.log = [](LogLevel, std::string_view) {};
  auto bus = std::make_shared<LocalBus>();
  PushGateway g(bus, std::make_shared<BookingEngine>(bus), plain);
  CHECK_FALSE(g.tls_enabled());
  CHECK(g.reload_tls().error().is(errc::bad_request));
}

TEST_CASE("mutual TLS: with a client CA, only clients with a certificate it signed get in") {
  const auto& certs = TestCerts::shared();
  auto tls = server_tls(certs);
  tls.client_ca_file = certs.file("ca.pem");
  Server s(tls);
  TlsProbe without(s.port, test::probe(certs.file("ca.pem")));
  // TLS 1.3 reports the missing certificate after the client's side of the handshake is done:
  // then the first read fails.
  if (without.ok()) {
    without.write("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    CHECK(without.read_until("\r\n\r\n").find("HTTP/1.1 200") == std::string::npos);
  }
  auto options = s.ws_options("judy");
  options.tls.cert_file = certs.file("client.pem");
  options.tls.key_file = certs.file("client.key");
  auto ws = client::WsClient::connect(options);
  REQUIRE(ws);
  CHECK((*ws)->request({{"op", "ping"}}).value().at("ok") == true);
}

TEST_CASE("pushbook's clients give up on a server that never answers, within their timeout") {
  // A listening socket nobody accepts on: the kernel completes the TCP handshake, then silence.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  REQUIRE(::listen(fd, 16) == 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const auto port = ntohs(addr.sin_port);
  for (const bool tls : {true, false}) {
    CAPTURE(tls);
    client::ConnectOptions c;
    c.port = port;
    c.timeout = 300ms;
    c.tls.enabled = tls;
    c.tls.insecure = true;
    auto start = std::chrono::steady_clock::now();
    auto ws = client::WsClient::connect(c);
    CHECK_FALSE(ws);
    CHECK(std::chrono::steady_clock::now() - start < 3s);
    client::TlsClientOptions t;
    t.enabled = tls;
    t.insecure = true;
    client::HttpClient http("127.0.0.1", port, 300ms, t);
    start = std::chrono::steady_clock::now();
    auto r = http.request("GET", "/healthz");
    REQUIRE_FALSE(r);
    CHECK(r.error().message.find("timeout") != std::string::npos);
    CHECK(std::chrono::steady_clock::now() - start < 3s);
  }
  ::close(fd);
}

TEST_CASE("URLs: https:// and wss:// select TLS; bad URLs are refused with the reason") {
  const auto& certs = TestCerts::shared();
  Server s(server_tls(certs));
  client::TlsClientOptions trust;
  trust.ca_file = certs.file("ca.pem");
  auto https = client::HttpClient::from_url(fmt::format("https://127.0.0.1:{}/ignored", s.port), trust);
  REQUIRE(https);
  CHECK((*https)->request("GET", "/healthz").value().status == 200);
  auto c = client::ConnectOptions::from_url(fmt::format("wss://localhost:{}/v1/ws", s.port)).value();
  CHECK(c.tls.enabled);
  CHECK(c.target == "/v1/ws");
  c.tls.ca_file = certs.file("ca.pem");
  c.token = token("ken");
  auto ws = client::WsClient::connect(c);
  REQUIRE(ws);
  CHECK((*ws)->request({{"op", "ping"}}).value().at("ok") == true);
  // --insecure: no verification (a self-signed server).
  client::TlsClientOptions insecure;
  insecure.insecure = true;
  CHECK(client::HttpClient::from_url(fmt::format("https://127.0.0.1:{}", s.port), insecure)
            .value()
            ->request("GET", "/healthz")
            .value()
            .status == 200);
  // Without the CA the server's certificate is not trusted.
  auto untrusted = client::HttpClient::from_url(fmt::format("https://127.0.0.1:{}", s.port)).value();
  auto refused = untrusted->request("GET", "/healthz");
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message.find("certificate verify failed") != std::string::npos);

  CHECK(client::Url::parse("ftp://x/").error().is(errc::bad_request));
  CHECK(client::Url::parse("not a url").error().is(errc::bad_request));
  CHECK(client::Url::parse("wss://h:0/").error().is(errc::bad_request));
  auto defaults = client::Url::parse("wss://example.com").value();
  CHECK(defaults.port == 443);
  CHECK(defaults.target == "/");
  CHECK(client::Url::parse("http://[::1]:8080/a?b=c").value().host == "::1");
  CHECK(client::Url::parse("http://[::1]:8080/a?b=c").value().target == "/a?b=c");
}

TEST_CASE("a host's Beast TLS server hands its connections to the gateway (pushbook/beast_ssl.hpp)") {
  namespace net = boost::asio;
  namespace beast = boost::beast;
  namespace http = beast::http;
  const auto& certs = TestCerts::shared();
  auto bus = std::make_shared<LocalBus>();
  auto engine = std::make_shared<BookingEngine>(bus);
  engine->add_resource("room", 5).value();
  GatewayOptions o;
  o.secret = secret;
  o.threads = 1;
  o.log = [](LogLevel, std::string_view) {};
  PushGateway gw(bus, engine, o);  // no listen() and no TLS options: the host terminates TLS

  net::io_context host;
  net::ssl::context ctx(net::ssl::context::tls_server);
  ctx.use_certificate_chain_file(certs.file("server.pem"));
  ctx.use_private_key_file(certs.file("server.key"), net::ssl::context::pem);
  net::ip::tcp::acceptor acceptor(host, {net::ip::make_address("127.0.0.1"), 0});
  const auto port = acceptor.local_endpoint().port();
  std::thread server([&] {
    beast::ssl_stream<beast::tcp_stream> stream(acceptor.accept(net::make_strand(host)), ctx);
    stream.handshake(net::ssl::stream_base::server);
    beast::flat_buffer buffer;
    http::request<http::string_body> req;
    http::read(stream, buffer, req);
    serve_request(gw, std::move(stream), std::move(req));
    host.run();  // the connection stays on the host's executor
  });
  client::ConnectOptions c;
  c.port = port;
  c.token = token("leo");
  c.tls.enabled = true;
  c.tls.ca_file = certs.file("ca.pem");
  {
    auto ws = client::WsClient::connect(c);
    REQUIRE(ws);
    auto ack = (*ws)->request({{"op", "book"}, {"resource", "room"}}).value();
    CHECK(ack.at("ok") == true);
  }
  gw.stop();
  server.join();
}
