// The WebSocket protocol (ConnectionLogic) fed any frames a client can send: each input is one
// connection, its lines the text frames in order (an empty line is a binary frame), over a real
// in-process LocalBus and BookingEngine. A "$last" in a frame stands for the id of the last
// booking this connection made, so that cancel and subscribe reach a real booking.
// Invariants: every message the server sends is a JSON object of a documented type; a reply
// carries a stable error code (never "internal" over the in-memory store); each frame gets exactly
// one reply, or closes the connection.
#include "fuzz_check.hpp"

#include "gateway/protocol.hpp"

#include <pushbook/event_bus.hpp>

#include <boost/json/parse.hpp>

#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <vector>

using namespace pushbook;
using namespace pushbook::detail;
using namespace std::chrono_literals;

namespace {

constexpr std::string_view secret = "fuzz-secret";
constexpr std::size_t max_frames = 64;

// A bus, an engine and the context connections share: new for each input, so that an input's
// result does not depend on the ones before it (a crash reproduces from its input alone) and
// nothing piles up over a long run (libFuzzer's leak check after an input stays meaningful).
struct World {
  GatewayMetrics metrics;
  std::shared_ptr<GatewayContext> ctx = std::make_shared<GatewayContext>();
  World() {
    ctx->bus = std::make_shared<LocalBus>();
    ctx->hub = std::make_shared<TopicHub>(ctx->bus);
    EngineOptions eo;
    eo.workers = 1;
    eo.node_id = 1;
    ctx->engine = std::make_shared<BookingEngine>(ctx->bus, eo);
    ctx->engine->add_resource("room-101", 1'000'000).value();
    ctx->engine->add_resource("hall", 2).value();
    GatewayOptions o;
    o.secret = std::string(secret);
    o.rate_limit_per_second = 20;  // one frame per 50 ms is sustained; faster ones use the burst
    o.rate_limit_burst = 8;
    o.max_subscriptions = 4;
    o.token_refresh_grace = 1s;
    ctx->options = o;
    ctx->metrics = &metrics;
  }
  ~World() { ctx->engine->shutdown(); }
};

void check_server_message(std::string_view text, std::string* booking_id, std::size_t* replies) {
  boost::system::error_code ec;
  const auto v = boost::json::parse(text, ec);
  FUZZ_CHECK(!ec);
  FUZZ_CHECK(v.is_object());
  const auto& o = v.as_object();
  const auto* type = o.if_contains("type");
  FUZZ_CHECK(type && type->is_string());
  const std::string_view t = type->get_string();
  static const std::set<std::string_view> types{"reply", "event", "gap", "notice"};
  FUZZ_CHECK(types.contains(t));
  if (t != "reply") return;
  ++*replies;
  const auto* id = o.if_contains("id");
  FUZZ_CHECK(id && (id->is_null() || id->is_int64() || id->is_uint64()));
  const auto* ok = o.if_contains("ok");
  FUZZ_CHECK(ok && ok->is_bool());
  if (ok->get_bool()) {
    const auto* result = o.if_contains("result");
    FUZZ_CHECK(result && result->is_object());
    if (const auto* b = result->as_object().if_contains("booking_id"); b && b->is_string())
      *booking_id = std::string(b->get_string());
    return;
  }
  const auto* error = o.if_contains("error");
  FUZZ_CHECK(error && error->is_object());
  const auto* code = error->as_object().if_contains("code");
  FUZZ_CHECK(code && code->is_string());
  static const std::set<std::string_view> codes{"bad_request",  "unauthorized",         "forbidden",
                                                "not_found",    "idempotency_conflict", "sold_out",
                                                "rate_limited", "overloaded",           "too_large"};
  FUZZ_CHECK(codes.contains(code->get_string()));
  const auto* message = error->as_object().if_contains("message");
  FUZZ_CHECK(message && message->is_string());
}

// Records what the connection sends, checking each message; post() queues for the "strand",
// which is this thread running run_posted().
struct RecordingSink : ConnectionSink {
  std::mutex mutex;
  std::size_t replies = 0;
  std::size_t closes = 0;
  std::string last_booking_id = "none";
  std::vector<std::function<void()>> posted;

  void send_text(std::shared_ptr<const std::string> message) override {
    FUZZ_CHECK(message != nullptr);
    std::lock_guard lock(mutex);
    check_server_message(*message, &last_booking_id, &replies);
  }
  void send_event(const EventPtr& event, bool snapshot) override {
    FUZZ_CHECK(event != nullptr);
    std::lock_guard lock(mutex);
    std::size_t replies_in_events = 0;
    check_server_message(*event->wire(snapshot), &last_booking_id, &replies_in_events);
    FUZZ_CHECK(replies_in_events == 0);
  }
  void close(std::uint16_t code, std::string reason) override {
    FUZZ_CHECK(code == 1008 || code == 4001);
    FUZZ_CHECK(!reason.empty());
    std::lock_guard lock(mutex);
    ++closes;
  }
  void post(std::function<void()> fn) override {
    std::lock_guard lock(mutex);
    posted.push_back(std::move(fn));
  }
  void run_posted() {
    for (;;) {
      std::vector<std::function<void()>> now;
      {
        std::lock_guard lock(mutex);
        now.swap(posted);
      }
      if (now.empty()) return;
      for (auto& fn : now) fn();
    }
  }
  std::size_t answers() {
    std::lock_guard lock(mutex);
    return replies + closes;
  }
  std::string booking_id() {
    std::lock_guard lock(mutex);
    return last_booking_id;
  }
};

std::string with_last_booking(std::string_view frame, const std::string& booking_id) {
  std::string out(frame);
  for (auto at = out.find("$last"); at != std::string::npos; at = out.find("$last", at + booking_id.size()))
    out.replace(at, 5, booking_id);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  auto world = std::make_unique<World>();
  auto sink = std::make_shared<RecordingSink>();
  const auto start = steady::now();
  {
    ConnectionLogic connection(world->ctx, sink, "alice", std::chrono::system_clock::now() + 1h);
    auto now = start;
    std::string_view rest = pushbook::fuzz::as_text(data, size);
    for (std::size_t frames = 0; !rest.empty() && frames < max_frames; ++frames) {
      const auto newline = rest.find('\n');
      const auto frame = rest.substr(0, newline);
      rest = newline == std::string_view::npos ? std::string_view{} : rest.substr(newline + 1);
      const auto before = sink->answers();
      if (frame.empty()) {
        connection.on_binary(now);  // binary frames come fast: no time passes
      } else {
        now += 50ms;
        connection.on_message(with_last_booking(frame, sink->booking_id()), now);
      }
      sink->run_posted();
      FUZZ_CHECK(sink->answers() == before + 1);
      FUZZ_CHECK(connection.subscriptions() <= world->ctx->options.max_subscriptions);
    }
    // The token runs out: a notice, then (no refresh within the grace) close 4001. A refresh
    // among the frames moved the deadline; without one it is an hour from the start.
    if (const auto deadline = connection.next_deadline()) {
      const auto closes = sink->closes;
      connection.on_deadline(*deadline);
      const auto grace_end = connection.next_deadline();
      FUZZ_CHECK(grace_end.has_value());
      connection.on_deadline(*grace_end);
      FUZZ_CHECK(sink->closes == closes + 1);
      FUZZ_CHECK(!connection.next_deadline().has_value());
    }
  }
  // Answers that come after the connection ended are dropped, as the session's post() does.
  {
    std::lock_guard lock(sink->mutex);
    sink->posted.clear();
  }
  FUZZ_CHECK(world->metrics.subscriptions.load() == 0);
  return 0;
}
