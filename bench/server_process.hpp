// Process helpers shared by the benchmarks that run pushbook-server as a child process: start it
// on a free port, stop it, and read its CPU time and memory from /proc.
#pragma once

#include <fmt/format.h>

#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

extern char** environ;

namespace pushbook::bench {

// The directory of the running executable (where the build puts pushbook-server too).
inline std::string self_dir() {
  char buf[4096];
  const auto n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  std::string p(buf, n > 0 ? static_cast<std::size_t>(n) : 0);
  return p.substr(0, p.rfind('/'));
}

// More environment for every server child (NAME=VALUE; a NAME already set is replaced), such as
// GLIBC_TUNABLES for the server alone: the benchmark that starts it keeps its own environment.
inline std::vector<std::string>& server_env() {
  static std::vector<std::string> env;
  return env;
}

// Adds NAME=VALUE to server_env(), in place of an earlier entry of the same NAME.
inline void set_server_env(std::string entry) {
  const auto name = entry.substr(0, entry.find('=') + 1);
  auto& env = server_env();
  std::erase_if(env, [&](const std::string& e) { return e.starts_with(name); });
  env.push_back(std::move(entry));
}

// `environ` with server_env() over it, for posix_spawn.
inline std::vector<std::string> child_environment() {
  std::vector<std::string> env;
  auto name_of = [](std::string_view entry) { return entry.substr(0, entry.find('=')); };
  for (char** e = environ; *e; ++e) {
    const std::string_view entry(*e);
    bool replaced = false;
    for (const auto& extra : server_env()) replaced = replaced || name_of(extra) == name_of(entry);
    if (!replaced) env.emplace_back(entry);
  }
  env.insert(env.end(), server_env().begin(), server_env().end());
  return env;
}

// pushbook-server (or `args[0]`) as a child: `args` must make it listen on a port it prints in its
// "listening on http://127.0.0.1:PORT" line. Its stdout comes through a pipe (drained by a thread
// after that line); its log (stderr) goes to a temporary file that is shown if it does not start.
struct ServerProcess {
  pid_t pid = -1;
  std::uint16_t port = 0;
  std::thread drain;

  /// The write end of the child's stdin when it was started `with_input` (else -1).
  int input = -1;

  explicit ServerProcess(std::vector<std::string> args, bool with_input = false) {
    auto env = child_environment();
    std::vector<char*> envp;
    for (auto& e : env) envp.push_back(e.data());
    envp.push_back(nullptr);
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    int in[2] = {-1, -1};
    if (with_input && pipe(in) != 0) throw std::runtime_error("pipe failed");
    char log_path[] = "/tmp/pushbook-bench-server-XXXXXX";
    const int log_fd = mkstemp(log_path);
    if (log_fd < 0) throw std::runtime_error("cannot create a temporary file for the server's log");
    unlink(log_path);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
    posix_spawn_file_actions_addclose(&fa, out[0]);
    if (with_input) {
      posix_spawn_file_actions_adddup2(&fa, in[0], 0);
      posix_spawn_file_actions_addclose(&fa, in[1]);
    }
    const int rc = posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), envp.data());
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    if (with_input) {
      close(in[0]);
      input = in[1];
    }
    if (rc != 0) {
      if (input >= 0) close(input);
      close(out[0]);
      close(log_fd);
      throw std::runtime_error(fmt::format("cannot start {}: {}", args[0], std::strerror(rc)));
    }
    // The "listening on" line (lines before it, such as the store's, are skipped), within 15 s: a
    // server that hangs before it must not hang us.
    std::string line, before;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(15);
    while (line.find("listening on") == std::string::npos) {
      before += line;
      line.clear();
      bool complete = false;
      for (char c = 0; !complete;) {
        pollfd p{out[0], POLLIN, 0};
        const auto left =
            std::chrono::duration_cast<std::chrono::milliseconds>(give_up - std::chrono::steady_clock::now())
                .count();
        if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0 || read(out[0], &c, 1) != 1) break;
        if (c == '\n')
          complete = true;
        else
          line += c;
      }
      if (!complete) break;
    }
    const auto at = line.find("127.0.0.1:");
    if (at == std::string::npos) {
      close(out[0]);
      stop();
      std::string log(4096, '\0');
      const auto n = pread(log_fd, log.data(), log.size(), 0);
      close(log_fd);
      log.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
      throw std::runtime_error(fmt::format("{} did not start:\n{}{}{}", args[0], before, line, log));
    }
    close(log_fd);
    port = static_cast<std::uint16_t>(std::stoi(line.substr(at + 10)));
    drain = std::thread([fd = out[0]] {
      char buf[256];
      while (read(fd, buf, sizeof buf) > 0) {
      }
      close(fd);
    });
  }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;
  ~ServerProcess() { stop(); }

  // SIGTERM (a graceful stop), then wait for it.
  /// Writes a line to the child's stdin (started `with_input`); false when it cannot.
  bool send_line(const std::string& line) {
    const std::string l = line + "\n";
    return input >= 0 && write(input, l.data(), l.size()) == static_cast<ssize_t>(l.size());
  }

  void stop() {
    if (input >= 0) {
      close(input);
      input = -1;
    }
    if (pid <= 0) return;
    kill(pid, SIGTERM);
    int status;
    waitpid(pid, &status, 0);
    pid = -1;
    if (drain.joinable()) drain.join();
  }
};

// CPU seconds of process `pid` so far, in user space and in the kernel (/proc/PID/stat's utime
// and stime); nullopt when it cannot be read.
struct CpuSplit {
  double user = 0;
  double system = 0;
};
inline std::optional<CpuSplit> process_cpu_split(long pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s((std::istreambuf_iterator<char>(f)), {});
  const auto close_paren = s.rfind(')');
  if (close_paren == std::string::npos) return std::nullopt;
  std::istringstream rest(s.substr(close_paren + 2));
  std::string field;
  long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::stol(field);
    if (i == 15) stime = std::stol(field);
  }
  const auto tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  return CpuSplit{static_cast<double>(utime) / tick, static_cast<double>(stime) / tick};
}

// Context switches of process `pid` so far, summed over its live threads
// (/proc/PID/task/*/status; a thread that exited no longer counts): voluntary (it waited:
// epoll_wait with nothing to do, a lock) and involuntary (preempted, e.g. by a thread it woke on
// its own core). nullopt when none can be read.
struct ContextSwitches {
  std::uint64_t voluntary = 0;
  std::uint64_t involuntary = 0;
};
inline std::optional<ContextSwitches> process_context_switches(long pid) {
  ContextSwitches total;
  bool any = false;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream f(task.path() / "status");
    for (std::string line; std::getline(f, line);) {
      const bool voluntary = line.starts_with("voluntary_ctxt_switches:");
      if (!voluntary && !line.starts_with("nonvoluntary_ctxt_switches:")) continue;
      const auto digits = line.find_first_of("0123456789");
      std::uint64_t n = 0;
      if (digits == std::string::npos ||
          std::from_chars(line.data() + digits, line.data() + line.size(), n).ec != std::errc{})
        continue;
      if (voluntary) {
        total.voluntary += n;
        any = true;
      } else {
        total.involuntary += n;
      }
    }
  }
  if (!any) return std::nullopt;
  return total;
}

// CPU seconds (user + system) a process has used; nullopt when it cannot be read.
inline std::optional<double> process_cpu_seconds(long pid) {
  const auto split = process_cpu_split(pid);
  if (!split) return std::nullopt;
  return split->user + split->system;
}

// CPU seconds (user + system) of the processes `roots` and all their descendants, including
// what their children that exited and were waited for used (cutime, cstime): a cluster's nodes,
// nginx and its workers, PostgreSQL and its backends. nullopt when no root can be read.
inline std::optional<double> process_tree_cpu_seconds(const std::vector<long>& roots) {
  struct stat_line {
    long ppid = 0;
    long ticks = 0;  // utime + stime + cutime + cstime
  };
  std::map<long, stat_line> all;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const auto name = entry.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(entry.path() / "stat");
    std::string s((std::istreambuf_iterator<char>(f)), {});
    const auto close_paren = s.rfind(')');
    if (close_paren == std::string::npos) continue;
    std::istringstream rest(s.substr(close_paren + 2));
    std::string field;
    stat_line line;
    for (int i = 3; i <= 17 && rest >> field; ++i) {
      if (i == 4) line.ppid = std::stol(field);
      if (i >= 14) line.ticks += std::stol(field);
    }
    all.emplace(std::stol(name), line);
  }
  std::multimap<long, long> children;
  for (const auto& [pid, line] : all) children.emplace(line.ppid, pid);
  std::vector<long> todo;
  for (long root : roots)
    if (all.count(root)) todo.push_back(root);
  if (todo.empty()) return std::nullopt;
  std::set<long> seen;
  long ticks = 0;
  while (!todo.empty()) {
    const long pid = todo.back();
    todo.pop_back();
    if (!seen.insert(pid).second) continue;
    ticks += all[pid].ticks;
    for (auto [it, end] = children.equal_range(pid); it != end; ++it) todo.push_back(it->second);
  }
  return static_cast<double>(ticks) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// Resident memory of a process in KiB (0 when it cannot be read).
inline long process_rss_kib(long pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  long value = 0;
  while (f >> key) {
    if (key == "VmRSS:") {
      f >> value;
      return value;
    }
    f.ignore(4096, '\n');
  }
  return 0;
}

// A directory of our own under $TMPDIR (or /tmp), removed with everything in it at the end.
struct TempDir {
  std::string path;
  explicit TempDir(const std::string& prefix = "pushbook-bench") {
    const char* base = std::getenv("TMPDIR");
    std::string pattern = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
    if (!::mkdtemp(pattern.data()))
      throw std::runtime_error(fmt::format("mkdtemp: {}", std::strerror(errno)));
    path = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace pushbook::bench
