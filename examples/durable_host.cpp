// durable_host: a host that serves clients through pushbook's gateway, with bookings in SQLite
// (docs/getting-started-cpp.md, "Bookings that survive a crash" and "Serving clients"). A client
// books over WebSocket and gets the decision pushed on the same socket.
//
//   pushbook-durable-host [DATABASE]      (default bookings.db; run it twice: the second run
//                                          recovers what the first stored)
#include <pushbook/auth.hpp>
#include <pushbook/booking_engine.hpp>
#include <pushbook/client.hpp>
#include <pushbook/push_gateway.hpp>
#include <pushbook/sqlite_store.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

int main(int argc, char** argv) {
  const std::string database = argc > 1 ? argv[1] : "bookings.db";
  auto bus = std::make_shared<pushbook::LocalBus>();

  // Bookings that survive a crash: an ACK means stored; a start over the file recovers it all.
  pushbook::SqliteOptions so;
  so.sync = pushbook::SqliteSync::normal;  // full: an fsync per group, survives power loss
  auto store = pushbook::SqliteStore::open(database, so);
  if (!store) {  // store_failed: not a pushbook database, newer schema, locked, ... (it says)
    std::fprintf(stderr, "%s\n", store.error().message.c_str());
    return 1;
  }
  pushbook::EngineOptions options;
  options.store = *store;                                // or pushbook::open_store("sqlite:...")
  options.recovery = pushbook::RecoveryPolicy::requeue;  // or reject: reason "recovery"
  auto engine = std::make_shared<pushbook::BookingEngine>(bus, options);  // recovers here
  engine->add_resource("room-101", 5).value();  // reconciled with the stored capacity
  std::printf("recovered %llu undecided bookings\n",
              static_cast<unsigned long long>(engine->stats().recovered));

  // Serving clients: the gateway on its own threads (go.threads, default: one per core).
  const char* env_secret = std::getenv("PUSHBOOK_SECRET");  // HS256 key of your identity provider
  const std::string secret = env_secret ? env_secret : "a-development-secret-of-32-bytes";
  pushbook::GatewayOptions go;
  go.host = "127.0.0.1";  // "0.0.0.0" to serve other machines
  go.port = 0;            // any free port; a real server names one
  go.secret = secret;
  go.allowed_origins = {"https://app.example.com"};
  pushbook::PushGateway gateway(bus, engine, go);
  const auto port = gateway.listen().value();
  std::printf("listening on ws://127.0.0.1:%u/v1/ws\n", port);

  // A client (here pushbook's own C++ client): book, then the decision on the same socket.
  pushbook::client::ConnectOptions co;
  co.port = port;
  co.token = pushbook::sign_token("alice", std::chrono::system_clock::now() + std::chrono::hours(1), secret);
  auto ws = pushbook::client::WsClient::connect(co).value();
  auto reply = ws->request({{"op", "book"}, {"resource", "room-101"}}).value();
  const std::string id(reply.at("result").at("booking_id").as_string());
  std::printf("ACK: %s\n", id.c_str());
  std::string status = "processing";
  while (status == "processing") {
    auto event = ws->next(std::chrono::seconds(5));
    if (!event) break;  // no decision within 5 s
    if (event->at("type") == "event" && event->at("topic").as_string() == "booking/" + id)
      status = std::string(event->at("data").at("status").as_string());
  }
  std::printf("decision: %s\n", status.c_str());

  gateway.stop();  // on SIGTERM in a real server: 1001 to WebSockets, drains, joins
  engine->shutdown();
  return status == "confirmed" ? 0 : 1;
}
