// Accepts TCP connections and hands each to the gateway on the next io_context.
#pragma once

#include "gateway/core.hpp"

namespace pushbook::detail {

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(std::shared_ptr<GatewayCore> core, net::io_context& ioc);
  /// Binds and listens; returns the bound port.
  result<std::uint16_t> open(const std::string& host, std::uint16_t port);
  void run();
  /// Stops accepting (any thread).
  void stop();

 private:
  void do_accept();
  void on_accept(boost::system::error_code ec, tcp::socket socket);

  std::shared_ptr<GatewayCore> core_;
  tcp::acceptor acceptor_;
  net::steady_timer retry_timer_;
};

}  // namespace pushbook::detail
