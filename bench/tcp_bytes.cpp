// The bytes a TCP socket has carried, from the kernel's own count (TCP_INFO), so the load
// generator reports what really crossed the connection: HTTP heads and bodies, WebSocket
// handshakes and frame headers, SSE framing. Kept in its own file because <linux/tcp.h> (which
// has these fields) clashes with the <netinet/tcp.h> that Asio includes.
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>

namespace pushbook::bench {

std::uint64_t tcp_bytes(int fd) {
  tcp_info info{};
  socklen_t len = sizeof info;
  if (fd < 0 || getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return 0;
  return info.tcpi_bytes_acked + info.tcpi_bytes_received;
}

}  // namespace pushbook::bench
