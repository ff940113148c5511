// One HTTP/1.1 connection: reads requests (with a header deadline against slow-loris), answers
// the REST routes, long-polls, and hands the connection over to a WebSocket or SSE session when
// the request asks for one.
#pragma once

#include "gateway/core.hpp"
#include "gateway/http_request.hpp"
#include "gateway/stream.hpp"

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/url/url_view.hpp>

#include <optional>

namespace pushbook::detail {

using Response = http::response<http::string_body>;

/// Over a PlainStream or a TlsStream (gateway/stream.hpp; instantiated for both).
template <class Stream>
class HttpSession : public Session, public std::enable_shared_from_this<HttpSession<Stream>> {
 public:
  /// `refuse`: answer 503 (connection limit) and close. `already_read`: bytes of the first
  /// request read before the session began (the bytes a TLS detection looked at).
  HttpSession(std::shared_ptr<GatewayCore> core, Stream stream, bool refuse,
              std::string_view already_read = {});
  ~HttpSession() override;
  void run();
  /// Serves a request the host already read from `stream` (pushbook/beast.hpp).
  void run_with(Request request);
  void shutdown() override;
  void abort() override;

 private:
  void do_read();
  void read_request();
  void on_read(boost::system::error_code ec, std::size_t bytes);
  void handle(Request&& req);
  /// authenticate(), then the per-user rate limit; remembers the user for the access log.
  result<Identity> auth(const Request& req, const boost::urls::url_view& url, bool allow_subprotocol);
  void send(Response&& res, std::string_view route);
  void answer_booking(const Request& req, const result<Ack>& ack);
  void on_write(bool keep_alive, boost::system::error_code ec, std::size_t bytes);
  void do_close();

  Response json_response(const Request& req, http::status status, std::string body) const;
  Response error_response(const Request& req, const Error& e) const;
  Response error_response(const Request& req, http::status status, std::string_view code,
                          std::string_view message) const;

  void route_bookings(Request&& req, const boost::urls::url_view& url, std::string_view rest);
  void route_resources(const Request& req, std::string_view rest);
  void route_demo_token(const Request& req, const boost::urls::url_view& url);
  void route_static(const Request& req, std::string path);
  void start_long_poll(const Request& req, const Booking& booking, std::chrono::seconds wait);
  void finish_long_poll(bool timed_out);

  std::shared_ptr<GatewayCore> core_;
  Stream stream_;
  // The connection's strand, kept: a TLS stream handed to a WebSocket or SSE session is empty
  // (Beast's ssl_stream moves its state out), and shutdown()/abort() may still come here then.
  net::any_io_executor executor_;
  // Bounded: everything a client can make the parser hold before it decides (a chunk-size line,
  // a chunk extension, a trailer) lives here, before authentication (constructor).
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  Response response_;  // the one in flight
  bool refuse_;
  bool first_request_ = true;
  bool handed_over_ = false;
  std::atomic<bool> shutdown_requested_{false};
  bool counted_ = false;

  // The request being served, for the access log and Retry-After (strand only).
  std::chrono::steady_clock::time_point started_{};
  std::string user_;
  std::string method_;
  std::string route_;
  long retry_after_ = 0;

  // Long-poll state (strand only).
  struct LongPoll {
    std::string booking_id;
    std::uint64_t known_version = 0;
    unsigned http_version = 11;
    bool keep_alive = true;
    Subscription subscription;
    std::unique_ptr<net::steady_timer> timer;
  };
  std::optional<LongPoll> poll_;
};

}  // namespace pushbook::detail
