// A WebSocket client over plain TCP, served by the gateway's own RFC 6455 layer (ws_frame.hpp)
// instead of Beast's websocket::stream (kept for TLS and permessage-deflate: websocket_session.hpp).
// What an idle connection holds is the socket, this object, its protocol state and one pending
// read into a 128-byte buffer of its own: a longer input is read on into a per-thread buffer, and
// frames are written from a per-thread buffer straight to the socket; only what the kernel does not
// take at once (or an incomplete client frame) is kept per connection, until it is gone. Deadlines
// (keep-alive pings, idle and close-handshake timeouts, token expiry) live in the io_context's one
// Deadlines heap, not in a timer per connection. Measured in docs/benchmarks.md (issue #16).
#pragma once

#include "gateway/core.hpp"
#include "gateway/deadlines.hpp"
#include "gateway/http_request.hpp"
#include "gateway/outbound_queue.hpp"
#include "gateway/ws_frame.hpp"

#include <boost/asio/strand.hpp>

#include <array>
#include <optional>
#include <string>

namespace pushbook::detail {

/// The upgrade checks Beast's accept makes, done before the connection is handed over: nullopt
/// when `req` is a valid RFC 6455 upgrade, else the HTTP status and message to refuse it with
/// (426 for a version other than 13).
struct UpgradeRefusal {
  unsigned status;
  std::string message;
};
std::optional<UpgradeRefusal> check_upgrade(const Request& req);

/// Serves a checked upgrade `req` on `socket` (taken from its HTTP session) for `user`:
/// answers 101 and hands the connection to a RawWebSocketSession on the same io_context.
/// `already_read`: bytes read after the request (frames a client sent before the 101 came).
void start_raw_websocket(std::shared_ptr<GatewayCore> core, tcp::socket socket, const Request& req,
                         std::string user, std::optional<std::chrono::system_clock::time_point> token_expires,
                         std::string_view already_read);

/// Over the io_context's own executor (the gateway's io_contexts, one thread each) or a strand of
/// it (a host's io_context); instantiated for both.
template <class Executor>
class RawWebSocketSession : public Session,
                            public ConnectionSink,
                            public DeadlineTarget,
                            public std::enable_shared_from_this<RawWebSocketSession<Executor>> {
 public:
  using Socket = boost::asio::basic_stream_socket<tcp, Executor>;

  /// `socket`: the connection the upgrade request came on (its HTTP session is done with it).
  RawWebSocketSession(std::shared_ptr<GatewayCore> core, Socket socket);
  ~RawWebSocketSession() override;
  /// Answers the checked upgrade `req` with 101 and serves the connection for `user`;
  /// `already_read`: bytes read after the request (frames a client sent before the 101 came).
  void run(const Request& req, std::string user,
           std::optional<std::chrono::system_clock::time_point> token_expires, std::string_view already_read);

  // Session
  void shutdown() override;
  void abort() override;
  // ConnectionSink
  void send_text(std::shared_ptr<const std::string> message) override;
  void send_event(const EventPtr& event, bool snapshot) override;
  void send_event_once(const EventPtr& event) override;
  void close(std::uint16_t code, std::string reason) override;
  void post(std::function<void()> fn) override;
  // DeadlineTarget
  std::shared_ptr<DeadlineTarget> lock_target() override;
  void deadline_passed() override;

  // FrameReader's handler (strand only).
  bool on_message(bool text, std::string_view payload);
  bool on_ping(std::string_view payload);
  bool on_pong(std::string_view payload);
  bool on_close(std::uint16_t code, std::string_view reason);

 private:
  // open: messages flow. closing: a close frame was sent, the client's is awaited. draining: FIN
  // sent, the client's input is discarded until its FIN. finished: the socket is closed.
  enum class State : std::uint8_t { open, closing, draining, finished };

  void wait_readable();
  void on_readable(boost::system::error_code ec, std::size_t n);
  /// on_readable's reading (`n`: bytes the reactor read into early_read_) and handling of the
  /// input.
  void read_input(std::size_t n);
  /// The client ended its input: the session ends ("closed" when it answered our close).
  void end_of_input();
  /// Feeds bytes read to the frame reader; false when the connection ends.
  bool consume(char* data, std::size_t size);
  void enqueue(std::shared_ptr<const std::string> bytes, const EventPtr& event);
  void do_write();
  void count_written(std::size_t messages, std::size_t bytes);
  /// Writes `count` (1 or 2) buffers: straight to the socket, or after the async write in flight;
  /// what the kernel does not take at once goes out by an async write of unsent_. False when the
  /// connection failed (and finished).
  bool send_bytes(const boost::asio::const_buffer* buffers, std::size_t count);
  void start_async_write();
  void on_async_written(boost::system::error_code ec);
  void start_close(std::uint16_t code, std::string_view reason);
  /// Sends a close frame and ends the connection once it is written (protocol errors, replies to a
  /// client's close).
  void close_and_end(std::uint16_t code, std::string_view reason);
  /// Half-closes after the last frame and drains the client's input until it closes too.
  void teardown();
  void schedule_deadline();
  void on_deadline();
  void finish(std::string_view why);
  std::string_view user() const noexcept { return logic_ ? std::string_view(logic_->user()) : "-"; }

  std::shared_ptr<GatewayCore> core_;
  Socket socket_;
  Deadlines* deadlines_;
  Deadlines::Slot slot_{};
  ws::FrameReader reader_;
  std::optional<ConnectionLogic> logic_;  // strand only; made once the 101 is sent
  OutboundQueue out_;
  // What the pending reactor read reads into (see wait_readable), written by the reactor while
  // that read is pending, read on the strand once it completed: a usual request fits, a longer
  // one is read on into the thread's buffer.
  std::array<char, 128> early_read_;
  // Strand only. What is rarely there is behind a pointer: an idle connection is a few words.
  struct Unsent {
    std::string bytes;         // what the async write in flight writes
    std::string backlog;       // frames made while it does
    std::size_t messages = 0;  // messages in `bytes` not counted as pushed yet
    std::size_t payload = 0;
  };
  std::unique_ptr<Unsent> unsent_;  // only while an async write is in flight
  std::unique_ptr<std::pair<std::uint16_t, std::string>> close_pending_;
  State state_ = State::open;
  bool writing_async_ = false;
  bool end_after_write_ = false;       // the last frame (a close) is being written
  bool ping_sent_ = false;             // a keep-alive ping is unanswered since last_read_
  bool reading_ = false;               // on_readable is handling this connection's input
  bool flush_after_read_ = false;      // output came meanwhile: on_readable writes it at its end
  std::uint16_t close_code_ = 0;       // the code this side sent
  std::uint16_t peer_close_code_ = 0;  // the client's
  steady::time_point last_read_{};
  steady::time_point close_deadline_{};
  steady::time_point scheduled_ = steady::time_point::max();  // the earliest deadline asked for

  // For the access log (strand only).
  struct AccessLog {
    std::uint64_t messages_in = 0, bytes_in = 0, messages_out = 0, bytes_out = 0;
    std::chrono::steady_clock::time_point started{};
    std::string peer;
  };
  std::unique_ptr<AccessLog> access_;  // only with the access log on
};

}  // namespace pushbook::detail
