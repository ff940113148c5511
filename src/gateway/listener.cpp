#include "gateway/listener.hpp"

#include <fmt/format.h>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

namespace pushbook::detail {

Listener::Listener(std::shared_ptr<GatewayCore> core, net::io_context& ioc)
    : core_(std::move(core)), acceptor_(net::make_strand(ioc)), retry_timer_(acceptor_.get_executor()) {}

result<std::uint16_t> Listener::open(const std::string& host, std::uint16_t port) {
  boost::system::error_code ec;
  const auto address = net::ip::make_address(host, ec);
  if (ec) return Error(errc::bad_request, fmt::format("'{}' is not an IP address", host));
  const tcp::endpoint endpoint(address, port);
  acceptor_.open(endpoint.protocol(), ec);
  if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) acceptor_.bind(endpoint, ec);
  if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
  if (ec) return Error(errc::internal, fmt::format("cannot listen on {}:{}: {}", host, port, ec.message()));
  return acceptor_.local_endpoint().port();
}

void Listener::run() {
  net::post(acceptor_.get_executor(), [self = shared_from_this()] { self->do_accept(); });
}

void Listener::stop() {
  net::post(acceptor_.get_executor(), [self = shared_from_this()] {
    boost::system::error_code ec;
    self->acceptor_.close(ec);
    self->retry_timer_.cancel();
  });
}

void Listener::do_accept() {
  // Each connection goes to the next io_context (spread over threads; its handlers never run
  // concurrently: see connection_executor).
  acceptor_.async_accept(core_->connection_executor(),
                         [self = shared_from_this()](boost::system::error_code ec, tcp::socket socket) {
                           self->on_accept(ec, std::move(socket));
                         });
}

void Listener::on_accept(boost::system::error_code ec, tcp::socket socket) {
  if (ec == net::error::operation_aborted || !acceptor_.is_open()) return;
  if (ec) {
    // Typically out of file descriptors: wait a little instead of spinning on accept, and tell the
    // operator (a log line per period and /metrics, never one line per failure).
    core_->accept_failed(ec.message());
    core_->metrics.accept_paused.store(1);
    retry_timer_.expires_after(std::chrono::milliseconds(100));
    retry_timer_.async_wait([self = shared_from_this()](boost::system::error_code wait_ec) {
      self->core_->metrics.accept_paused.store(0);
      if (!wait_ec) self->do_accept();
    });
    return;
  }
  core_->accept_succeeded();
  core_->serve(std::move(socket));
  do_accept();
}

}  // namespace pushbook::detail
