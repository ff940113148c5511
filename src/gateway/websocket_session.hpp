// One WebSocket client: the handshake (auth checked before), the read loop feeding
// ConnectionLogic, and a bounded send queue of shared serialized events written with one frame
// per write: every message pending for the client goes out in a single newline-delimited frame.
#pragma once

#include "gateway/core.hpp"
#include "gateway/http_session.hpp"
#include "gateway/outbound_queue.hpp"

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/websocket/stream.hpp>

namespace pushbook::detail {

namespace websocket = boost::beast::websocket;

/// Over a PlainStream or a TlsStream (gateway/stream.hpp; instantiated for both).
template <class Stream>
class WebSocketSession : public Session,
                         public ConnectionSink,
                         public std::enable_shared_from_this<WebSocketSession<Stream>> {
 public:
  /// `stream`: the connection the upgrade request came on (its HTTP session is done with it).
  WebSocketSession(std::shared_ptr<GatewayCore> core, Stream stream);
  ~WebSocketSession() override;
  /// Completes the upgrade of `req` for the authenticated `user`.
  void run(Request req, std::string user, std::optional<std::chrono::system_clock::time_point> token_expires);

  void shutdown() override;
  void abort() override;
  void send_text(std::shared_ptr<const std::string> message) override;
  void send_event(const EventPtr& event, bool snapshot) override;
  void send_event_once(const EventPtr& event) override;
  void close(std::uint16_t code, std::string reason) override;
  void post(std::function<void()> fn) override;

 private:
  void on_accept(boost::system::error_code ec);
  void do_read();
  void on_first_byte(boost::system::error_code ec, std::size_t bytes);
  void read_rest();
  void on_read(boost::system::error_code ec, std::size_t bytes);
  void on_message(std::size_t bytes);
  void enqueue(std::shared_ptr<const std::string> bytes, const EventPtr& event);
  void do_write();
  void on_write(boost::system::error_code ec, std::size_t bytes);
  void start_close(websocket::close_reason reason);
  void arm_deadline();
  void finish();

  std::shared_ptr<GatewayCore> core_;
  websocket::stream<Stream> ws_;
  // An idle connection waits for the first byte of the next message in first_byte_ (Beast
  // reads the frame into its own buffer); the rest of the message goes to buffer_, which is
  // released again once the message is handled. So an idle connection holds no read buffer.
  char first_byte_ = 0;
  beast::flat_buffer buffer_;
  net::steady_timer deadline_timer_;
  std::unique_ptr<ConnectionLogic> logic_;  // strand only
  std::string user_;
  std::optional<std::chrono::system_clock::time_point> token_expires_;

  // What waits to be written (publisher threads push; the strand takes). Its writer is busy
  // while a do_write is posted or a write is in flight.
  OutboundQueue out_;

  // Strand only.
  std::size_t writing_ = 0;  // messages in the frame being written
  std::string frame_;        // the frame being written
  bool write_in_flight_ = false;
  std::optional<websocket::close_reason> close_pending_;
  bool close_sent_ = false;
  bool finished_ = false;
  bool opened_ = false;

  // For the access log (strand only).
  std::uint16_t close_code_ = 0;  // the code this side sent
  std::uint64_t messages_in_ = 0, bytes_in_ = 0, messages_out_ = 0, bytes_out_ = 0;
  std::chrono::steady_clock::time_point started_{};
  std::string peer_;  // only with the access log on
};

}  // namespace pushbook::detail
