// Test helper: a redis-server of the test's own, on a free loopback port, in a temporary
// directory, without persistence. Started by the constructor (it answers PING when it returns),
// stopped by the destructor. kill() and start() simulate a crash and a restart on the same port.
// Needs nothing of doctest: the benchmarks (bench/bus_bench.cpp, bench/gateway_bench.cpp) start
// their redis-server with it too.
// The server is killed when the thread that started it ends (PR_SET_PDEATHSIG), crashed test
// included: construct and start() it on a thread that outlives it (the test's own).
#pragma once

#include <hiredis/hiredis.h>

#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pushbook::test {

class RedisServer {
 public:
  /// Starts redis-server on a port the kernel says is free (retrying on a conflict), and on the
  /// unix socket unix_socket(); with a password, clients must AUTH.
  explicit RedisServer(std::string password = "") : password_(std::move(password)) {
    for (int attempt = 0; attempt < 5; ++attempt) {
      port_ = free_port();
      if (try_start()) return;
    }
    throw std::runtime_error("redis-server did not start (is /usr/bin/redis-server installed?)");
  }
  ~RedisServer() { stop(SIGTERM); }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  int port() const { return port_; }
  std::string address() const { return "redis://127.0.0.1:" + std::to_string(port_); }
  std::string unix_socket() const { return dir_.file("redis.sock"); }

  /// Kills the server (SIGKILL: no goodbye to clients, data gone) and waits for it to exit.
  void kill() { stop(SIGKILL); }

  /// Starts the server again on the same port, empty (no persistence).
  void start() {
    for (int attempt = 0; attempt < 20; ++attempt)
      if (try_start()) return;
    throw std::runtime_error("redis-server did not restart on port " + std::to_string(port_));
  }

  bool running() const { return pid_ > 0; }

  /// Stops the server without closing anything (SIGSTOP): connections stay open, nothing answers.
  void pause() { ::kill(pid_, SIGSTOP); }
  /// Lets a paused server go on (SIGCONT).
  void resume() { ::kill(pid_, SIGCONT); }

  /// One command on a short-lived connection of its own (for checks from tests), reply as text.
  std::string command(const std::vector<std::string>& args) const {
    redisContext* c = redisConnect("127.0.0.1", port_);
    if (!c || c->err) {
      if (c) redisFree(c);
      return "";
    }
    if (!password_.empty()) {
      auto* auth = static_cast<redisReply*>(redisCommand(c, "AUTH %s", password_.c_str()));
      if (auth) freeReplyObject(auth);
    }
    std::vector<const char*> argv;
    std::vector<std::size_t> lens;
    for (auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    auto* reply = static_cast<redisReply*>(
        redisCommandArgv(c, static_cast<int>(args.size()), argv.data(), lens.data()));
    std::string out = reply ? text(reply) : "";
    if (reply) freeReplyObject(reply);
    redisFree(c);
    return out;
  }

 private:
  // A reply as text: integers in decimal, arrays as their elements separated by spaces.
  static std::string text(const redisReply* reply) {
    if (reply->type == REDIS_REPLY_INTEGER) return std::to_string(reply->integer);
    if (reply->type == REDIS_REPLY_ARRAY) {
      std::string out;
      for (std::size_t i = 0; i < reply->elements; ++i) out += (i ? " " : "") + text(reply->element[i]);
      return out;
    }
    return reply->str ? std::string(reply->str, reply->len) : "";
  }

  static int free_port() {
    // Bind port 0 and read what the kernel chose; redis-server binds it right after (a race with
    // another process is possible, hence the retries in the constructor).
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) throw std::runtime_error("socket() failed");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    socklen_t len = sizeof addr;
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ::close(fd);
      throw std::runtime_error("cannot find a free port");
    }
    ::close(fd);
    return ntohs(addr.sin_port);
  }

  bool try_start() {
    const std::string port = std::to_string(port_);
    // clang-format off
    std::vector<std::string> args = {
        "/usr/bin/redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", dir_.path(), "--logfile", dir_.file("redis.log"), "--daemonize", "no",
        "--unixsocket", unix_socket(), "--unixsocketperm", "700"};
    // clang-format on
    if (!password_.empty()) {
      args.push_back("--requirepass");
      args.push_back(password_);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    // fork + exec rather than posix_spawn, for PR_SET_PDEATHSIG: the server dies with the thread
    // that started it, so a test that crashes (abort, a sanitizer report) leaves no redis-server
    // behind. Between fork and exec only async-signal-safe calls.
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) return false;
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);  // the parent is already gone
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    pid_ = pid;
    // Wait until it answers PING, or has exited (port taken), or the deadline passed.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = 0;
        return false;
      }
      if (command({"PING"}) == "PONG") return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling, bounded by the deadline
    }
    stop(SIGKILL);
    return false;
  }

  void stop(int signal) {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGCONT);  // a paused server would not act on SIGTERM
    ::kill(pid_, signal);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = 0;
  }

  // The server's directory (its socket and log), removed with everything in it at the end.
  class Directory {
   public:
    Directory() {
      std::string pattern = (std::filesystem::temp_directory_path() / "pushbook-redis-XXXXXX").string();
      if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed for " + pattern);
      path_ = pattern;
    }
    ~Directory() {
      std::error_code ec;
      std::filesystem::remove_all(path_, ec);
    }
    Directory(const Directory&) = delete;
    Directory& operator=(const Directory&) = delete;
    const std::string& path() const { return path_; }
    std::string file(const std::string& name) const { return path_ + "/" + name; }

   private:
    std::string path_;
  };

  std::string password_;
  Directory dir_;
  int port_ = 0;
  pid_t pid_ = 0;
};

}  // namespace pushbook::test
