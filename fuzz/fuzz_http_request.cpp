// Any bytes a client can send on an HTTP connection: read by Beast's parser with the session's
// limits (header_limit, read_buffer_limit, max_body_bytes) through beast::test::stream, one
// request after another as keep-alive and pipelining allow, and each request read by the
// functions the session calls before it acts (gateway/http_request.hpp): the target, the
// authentication (a gateway with a secret and one in development mode), ?topic=, the resume point,
// ?wait=, a booking id or resource id in the path, a booking body.
// Invariants: a read error is one the session answers (or a closed stream); what authenticates
// is a valid user; every error is one of the documented codes.
#include "fuzz_check.hpp"

#include "gateway/http_request.hpp"

#include <pushbook/event_bus.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/beast/_experimental/test/stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/websocket/rfc6455.hpp>
#include <boost/json/parse.hpp>
#include <boost/url/parse.hpp>

using namespace pushbook;
using namespace pushbook::detail;

namespace {

constexpr std::size_t max_requests = 8;

// Two gateways' contexts over one engine: one verifying tokens, one in development mode.
struct World {
  GatewayMetrics metrics;
  std::shared_ptr<GatewayContext> verifying = std::make_shared<GatewayContext>();
  std::shared_ptr<GatewayContext> dev = std::make_shared<GatewayContext>();
  World() {
    auto bus = std::make_shared<LocalBus>();
    EngineOptions eo;
    eo.workers = 1;
    auto engine = std::make_shared<BookingEngine>(bus, eo);
    engine->add_resource("room-101", 10).value();
    for (auto* ctx : {verifying.get(), dev.get()}) {
      ctx->bus = bus;
      ctx->engine = engine;
      ctx->metrics = &metrics;
    }
    verifying->options.secret = "fuzz-secret";
    dev->options.dev_insecure = true;
  }
};

void check_error(const Error& e) {
  FUZZ_CHECK(!e.message.empty());
  const auto w = wire_error(e.code);
  FUZZ_CHECK(std::string_view(w.code) != "internal");
  FUZZ_CHECK(w.http_status >= 400 && w.http_status < 500);
}

// What the session reads out of one request before it routes it.
void read_request(const World& world, const Request& req) {
  const auto url = boost::urls::parse_origin_form(req.target());
  if (!url) return;  // 400 malformed request target
  const std::string path(url->path());
  const bool upgrade = beast::websocket::is_upgrade(req);

  for (const auto* ctx : {world.verifying.get(), world.dev.get()}) {
    const auto who = authenticate(*ctx, req, *url, upgrade);
    if (!who) {
      FUZZ_CHECK(who.error().is(errc::unauthorized));
      check_error(who.error());
      continue;
    }
    FUZZ_CHECK(is_valid_id(who->user));
    if (auto topic = query_param(*url, "topic"); topic && is_valid_topic(*topic))
      (void)ctx->may_subscribe(who->user, *topic);
    if (req.method() == http::verb::post && !req.body().empty()) {
      boost::system::error_code ec;
      const auto body = boost::json::parse(req.body(), ec);
      if (!ec) {
        const auto request = booking_request_from_json(body, who->user);
        if (request)
          FUZZ_CHECK(request->user == who->user);
        else
          check_error(request.error());
      }
    }
  }

  const auto resume = resume_point(req, *url);
  if (!resume) FUZZ_CHECK(resume.error().is(errc::bad_request));
  const auto wait = long_poll_wait(*url, world.verifying->options.max_long_poll);
  if (wait)
    FUZZ_CHECK(wait->count() >= 0 && wait->count() <= world.verifying->options.max_long_poll.count());
  else
    FUZZ_CHECK(wait.error().is(errc::bad_request));

  // Ids in the path go to the engine as they are (it validates them).
  const auto& engine = *world.verifying->engine;
  if (path.starts_with("/v1/bookings/")) {
    if (auto b = engine.get(std::string_view(path).substr(13)); !b) check_error(b.error());
  }
  if (path.starts_with("/v1/resources/")) {
    if (auto r = engine.resource(std::string_view(path).substr(14)); !r) check_error(r.error());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const World world;
  static boost::asio::io_context ioc;
  beast::test::stream stream(ioc, pushbook::fuzz::as_text(data, size));
  stream.close_remote();  // the client sent everything: then end of stream
  beast::flat_buffer buffer(read_buffer_limit);
  for (std::size_t n = 0; n < max_requests; ++n) {
    http::request_parser<http::string_body> parser;
    parser.body_limit(world.verifying->options.max_body_bytes);
    parser.header_limit(header_limit);
    boost::system::error_code ec;
    http::read(stream, buffer, parser, ec);
    if (ec) {
      // Each has an answer in HttpSession::on_read (a close, 413, 431 or 400).
      FUZZ_CHECK(ec.category() == http::make_error_code(http::error::end_of_stream).category() ||
                 ec == boost::asio::error::eof);
      FUZZ_CHECK(buffer.size() <= read_buffer_limit);
      return 0;
    }
    auto req = parser.release();
    read_request(world, req);
    if (!req.keep_alive()) return 0;
  }
  return 0;
}
