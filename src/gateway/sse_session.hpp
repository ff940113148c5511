// A Server-Sent Events stream of one topic: "id: <seq>" on every event so that the browser's
// EventSource resumes with Last-Event-ID after a reconnect; a bounded send queue; keep-alive
// comments.
#pragma once

#include "gateway/core.hpp"
#include "gateway/stream.hpp"

#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/tcp_stream.hpp>

#include <deque>

namespace pushbook::detail {

namespace beast = boost::beast;

/// Over a PlainStream or a TlsStream (gateway/stream.hpp; instantiated for both).
template <class Stream>
class SseSession : public Session,
                   public ConnectionSink,
                   public std::enable_shared_from_this<SseSession<Stream>> {
 public:
  SseSession(std::shared_ptr<GatewayCore> core, Stream stream);
  ~SseSession() override;
  void run(unsigned http_version, std::string topic, std::optional<std::uint64_t> since,
           std::optional<std::uint32_t> epoch, std::string user);

  void shutdown() override;
  void abort() override;
  void send_text(std::shared_ptr<const std::string> message) override;
  void send_event(const EventPtr& event, bool snapshot) override;
  void close(std::uint16_t code, std::string reason) override;
  void post(std::function<void()> fn) override;

 private:
  void enqueue(std::string chunk);
  void do_write();
  void on_write(boost::system::error_code ec);
  void do_watch();
  void arm_keepalive();
  void finish();

  std::shared_ptr<GatewayCore> core_;
  Stream stream_;
  net::steady_timer keepalive_;
  std::array<char, 512> discard_{};
  Subscription subscription_;

  std::mutex mutex_;  // guards the queue: events arrive on publisher threads
  std::deque<std::string> queue_;
  std::size_t queued_bytes_ = 0;
  bool write_scheduled_ = false;
  bool closing_ = false;

  std::string writing_;  // strand only
  bool finished_ = false;

  // For the access log (strand only; names kept only with the access log on).
  std::chrono::steady_clock::time_point started_{};
  std::uint64_t bytes_out_ = 0;
  std::string user_, peer_, topic_;
};

}  // namespace pushbook::detail
