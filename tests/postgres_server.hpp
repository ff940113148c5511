// Test helper: a PostgreSQL server of the test's own, in a temporary directory, on a free
// loopback port and a unix socket in that directory, with one database ("pushbook") created.
// Started by the constructor (it accepts connections when it returns), stopped by the destructor.
// stop() and start() simulate the database going away and coming back with its data.
//
// PostgreSQL refuses to run as root, and the tests run as root: initdb and the server run as the
// `postgres` system user (the directory is chown'ed to it). The server is started directly
// (fork, setuid, exec of `postgres`, not pg_ctl) so that PR_SET_PDEATHSIG applies to it: it is
// killed when the thread that started it ends, crashed test included, and its backends follow
// the postmaster. Construct and start() it on a thread that outlives it (the test's own).
// Self-contained (no doctest): bench/store_bench.cpp starts one too.
#pragma once

#include <libpq-fe.h>
#include <stdlib.h>

#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace pushbook::test {

struct PostgresServerOptions {
  /// fsync=off and full_page_writes=off: fast tests, nothing survives a power loss (nothing
  /// needs to), but a commit is in the kernel's hands when it returns, so kill() loses nothing
  /// committed (synchronous_commit stays on: off would lose the last commits to a SIGKILL).
  /// Benchmarks set it false: they measure what a deployment would pay.
  bool fast_unsafe = true;
};

class PostgresServer {
  // The server's directory (data, socket, logs), removed with everything in it at the end.
  class directory {
   public:
    directory() {
      std::string pattern = (std::filesystem::temp_directory_path() / "pushbook-postgres-XXXXXX").string();
      if (!::mkdtemp(pattern.data())) throw std::runtime_error("cannot create a temporary directory");
      path_ = pattern;
    }
    ~directory() {
      std::error_code ec;
      std::filesystem::remove_all(path_, ec);
    }
    directory(const directory&) = delete;
    directory& operator=(const directory&) = delete;
    std::string path() const { return path_; }
    std::string file(const std::string& name) const { return path_ + "/" + name; }

   private:
    std::string path_;
  };

 public:
  static constexpr const char* bin_dir = "/usr/lib/postgresql/15/bin";

  explicit PostgresServer(PostgresServerOptions options = {}) : options_(options) {
    prepare_user();
    own_directory();
    run_as_postgres({std::string(bin_dir) + "/initdb", "-D", data_dir(), "-U", "postgres", "-A", "trust",
                     "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"},
                    dir_.file("initdb.log"));
    for (int attempt = 0; attempt < 5; ++attempt) {
      port_ = free_port();
      if (try_start()) {
        if (command("postgres", "CREATE DATABASE pushbook").empty() && !error_.empty())
          throw std::runtime_error("CREATE DATABASE failed: " + error_);
        return;
      }
    }
    throw std::runtime_error("postgres did not start (is postgresql-15 installed?); see " +
                             dir_.file("postgres.log"));
  }
  ~PostgresServer() { stop(); }
  PostgresServer(const PostgresServer&) = delete;
  PostgresServer& operator=(const PostgresServer&) = delete;

  int port() const { return port_; }
  /// The database as a libpq keyword/value conninfo, over the unix socket.
  std::string conninfo(const std::string& database = "pushbook") const {
    return "host=" + dir_.path() + " port=" + std::to_string(port_) + " user=postgres dbname=" + database;
  }
  /// The database as a postgresql:// URI over TCP (what pushbook-server --store takes).
  std::string uri(const std::string& database = "pushbook") const {
    return "postgresql://postgres@127.0.0.1:" + std::to_string(port_) + "/" + database;
  }

  /// The database as a postgresql:// URI over the unix socket.
  std::string socket_uri(const std::string& database = "pushbook") const {
    return "postgresql:///" + database + "?host=" + dir_.path() + "&port=" + std::to_string(port_) +
           "&user=postgres";
  }

  /// Fast shutdown (SIGINT): open transactions are rolled back, clients disconnected; the data
  /// stays. Waits for the server to exit.
  void stop() { signal(SIGINT); }
  /// Crash (SIGKILL to the postmaster and every backend at once: a backend left alone would
  /// go on serving its client until it notices the postmaster's death); no shutdown checkpoint,
  /// start() then recovers from the WAL.
  void kill() {
    if (pid_ <= 0) return;
    // Backends make themselves process-group leaders (postgres does so for every child), so a
    // kill of the postmaster's group misses them, and a backend killed late could still commit a
    // transaction after "the crash". The postmaster is stopped first (it forks no new backend),
    // then each of its children is killed, then the postmaster.
    ::kill(pid_, SIGSTOP);
    for (pid_t child : children_of(pid_)) ::kill(child, SIGKILL);
    ::kill(-pid_, SIGKILL);
    signal(SIGKILL);
  }
  /// Starts the server again on the same port with the same data.
  void start() {
    // After kill() the old backends may still be exiting (they notice the postmaster's death):
    // postgres then refuses to start on their shared memory, and a later attempt succeeds.
    for (int attempt = 0; attempt < 20; ++attempt) {
      if (try_start()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // bounded: 20 attempts
    }
    throw std::runtime_error("postgres did not restart on port " + std::to_string(port_));
  }
  bool running() const { return pid_ > 0; }

  /// Runs `sql` on a connection of its own; returns the first column of each row, joined by
  /// '\n' (empty when there are none). On failure returns "" and error() says why.
  std::string command(const std::string& database, const std::string& sql) {
    error_.clear();
    PGconn* c = PQconnectdb(conninfo(database).c_str());
    std::string out;
    if (PQstatus(c) != CONNECTION_OK) {
      error_ = PQerrorMessage(c);
    } else {
      PGresult* r = PQexec(c, sql.c_str());
      const auto st = PQresultStatus(r);
      if (st == PGRES_TUPLES_OK) {
        for (int i = 0; i < PQntuples(r); ++i) out += (i ? "\n" : "") + std::string(PQgetvalue(r, i, 0));
      } else if (st != PGRES_COMMAND_OK) {
        error_ = PQresultErrorMessage(r);
      }
      PQclear(r);
    }
    PQfinish(c);
    return out;
  }
  std::string query(const std::string& sql) { return command("pushbook", sql); }
  /// The error of the last command(), "" when it succeeded.
  const std::string& error() const { return error_; }

 private:
  std::string data_dir() const { return dir_.file("data"); }

  void prepare_user() {
    if (::getuid() != 0) return;  // not root: run everything as ourselves
    const passwd* pw = ::getpwnam("postgres");
    if (!pw) throw std::runtime_error("no 'postgres' user (install postgresql-15)");
    uid_ = pw->pw_uid;
    gid_ = pw->pw_gid;
  }

  void own_directory() {
    if (uid_ < 0) return;
    if (::chown(dir_.path().c_str(), static_cast<uid_t>(uid_), static_cast<gid_t>(gid_)) != 0)
      throw std::runtime_error("cannot chown " + dir_.path() + " to postgres");
  }

  // fork + exec as the postgres user. With `log`, output goes there. Returns the child's pid.
  // Between fork and exec only async-signal-safe calls. PR_SET_PDEATHSIG after setuid: changing
  // credentials clears it.
  pid_t spawn(std::vector<std::string> args, const std::string& log, bool die_with_parent) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t parent = ::getpid();
    const int uid = uid_, gid = gid_;
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      ::setpgid(0, 0);  // a process group of its own, with its backends: kill() ends them all
      if (gid >= 0 && (::setgroups(0, nullptr) != 0 || ::setgid(static_cast<gid_t>(gid)) != 0)) ::_exit(126);
      if (uid >= 0 && ::setuid(static_cast<uid_t>(uid)) != 0) ::_exit(126);
      if (die_with_parent) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (::getppid() != parent) ::_exit(127);  // the parent is already gone
      }
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        ::close(fd);
      }
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    return pid;
  }

  void run_as_postgres(std::vector<std::string> args, const std::string& log) {
    const pid_t pid = spawn(std::move(args), log, true);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) throw std::runtime_error("initdb failed; see " + log);
  }

  static int free_port() {
    // Bind port 0 and read what the kernel chose; postgres binds it right after (a race with
    // another process is possible, hence the retries).
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) throw std::runtime_error("socket() failed");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
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
    // clang-format off
    std::vector<std::string> args = {
        std::string(bin_dir) + "/postgres", "-D", data_dir(), "-p", std::to_string(port_),
        "-k", dir_.path(), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=100",
        "-c", "shared_buffers=32MB", "-c", "logging_collector=off"};
    // clang-format on
    if (options_.fast_unsafe)
      for (const char* setting : {"fsync=off", "full_page_writes=off"}) {
        args.push_back("-c");
        args.push_back(setting);
      }
    pid_ = spawn(args, dir_.file("postgres.log"), true);
    const std::string info = conninfo("postgres") + " connect_timeout=2";
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {  // exited: the port was taken, or worse
        pid_ = 0;
        return false;
      }
      if (PQping(info.c_str()) == PQPING_OK) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling, bounded by the deadline
    }
    signal(SIGKILL);
    return false;
  }

  // The processes whose parent is `parent` (from /proc/<pid>/stat).
  static std::vector<pid_t> children_of(pid_t parent) {
    std::vector<pid_t> out;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
      const auto name = entry.path().filename().string();
      if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream in(entry.path() / "stat");
      std::string stat;
      std::getline(in, stat);
      const auto close = stat.rfind(')');  // the command name may hold spaces and parentheses
      if (close == std::string::npos) continue;
      std::istringstream rest(stat.substr(close + 1));
      char state = 0;
      long ppid = 0;
      if (rest >> state >> ppid && ppid == parent) out.push_back(static_cast<pid_t>(std::stol(name)));
    }
    return out;
  }

  void signal(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = 0;
  }

  PostgresServerOptions options_;
  directory dir_;
  int uid_ = -1, gid_ = -1;
  int port_ = 0;
  pid_t pid_ = 0;
  std::string error_;
};

}  // namespace pushbook::test
