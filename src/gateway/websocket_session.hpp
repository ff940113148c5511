// One WebSocket client: the handshake (auth checked before), the read loop feeding
// ConnectionLogic, and a bounded send queue of shared serialized events written with one frame
// per write: every message pending for the client goes out in a single newline-delimited frame.
#pragma once

#include "gateway/core.hpp"
#include "gateway/http_session.hpp"

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/websocket/stream.hpp>

#include <deque>
#include <set>

namespace pushbook::detail {

namespace websocket = boost::beast::websocket;

class WebSocketSession : public Session,
                         public ConnectionSink,
                         public std::enable_shared_from_this<WebSocketSession> {
 public:
  WebSocketSession(std::shared_ptr<GatewayCore> core, tcp::socket socket);
  ~WebSocketSession() override;
  /// Completes the upgrade of `req` for the authenticated `user`.
  void run(Request req, std::string user, std::optional<std::chrono::system_clock::time_point> token_expires);

  void shutdown() override;
  void abort() override;
  void send_text(std::shared_ptr<const std::string> message) override;
  void send_event(const EventPtr& event, bool snapshot) override;
  void close(std::uint16_t code, std::string reason) override;
  void post(std::function<void()> fn) override;

 private:
  struct Item {
    std::shared_ptr<const std::string> bytes;
    EventPtr event;  // set for events (droppable), null for replies and notices
    bool snapshot = false;
  };

  void on_accept(boost::system::error_code ec);
  void do_read();
  void on_read(boost::system::error_code ec, std::size_t bytes);
  void enqueue(Item item);
  void do_write();
  void on_write(boost::system::error_code ec, std::size_t bytes);
  void start_close(websocket::close_reason reason);
  void arm_deadline();
  void finish();

  std::shared_ptr<GatewayCore> core_;
  websocket::stream<beast::tcp_stream> ws_;
  beast::flat_buffer buffer_;
  net::steady_timer deadline_timer_;
  std::unique_ptr<ConnectionLogic> logic_;  // strand only
  std::string user_;
  std::optional<std::chrono::system_clock::time_point> token_expires_;

  std::mutex mutex_;  // guards what publisher threads touch
  std::deque<Item> queue_;
  std::size_t queued_bytes_ = 0;
  std::uint64_t dropped_ = 0;
  std::set<std::string> dropped_topics_;
  bool write_scheduled_ = false;  // a do_write is posted or a write is in flight
  bool closing_ = false;          // no more output accepted

  // Strand only.
  std::vector<std::shared_ptr<const std::string>> writing_;
  std::string frame_;  // the frame being written
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
