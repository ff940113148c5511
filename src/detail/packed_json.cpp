#include "detail/packed_json.hpp"

#include <boost/json/memory_resource.hpp>
#include <boost/json/monotonic_resource.hpp>

#include <atomic>
#include <cstddef>
#include <new>

namespace pushbook::detail {

namespace {

// The block a packed value lives in, bump-allocated. Thread-safe: once the value is copied in,
// what a reader copies of it with the same storage (any thread) takes what is left of the block or
// comes from the heap; freeing a part of the block is nothing.
class packed_resource final : public boost::json::memory_resource {
 public:
  explicit packed_resource(std::size_t capacity)
      : block_(static_cast<unsigned char*>(::operator new(capacity == 0 ? 1 : capacity))),
        capacity_(capacity) {}
  ~packed_resource() override { ::operator delete(block_); }
  packed_resource(const packed_resource&) = delete;
  packed_resource& operator=(const packed_resource&) = delete;

 private:
  void* do_allocate(std::size_t n, std::size_t align) override {
    std::size_t used = used_.load(std::memory_order_relaxed);
    for (;;) {
      const std::size_t at = (used + align - 1) & ~(align - 1);
      if (at + n > capacity_) break;
      if (used_.compare_exchange_weak(used, at + n, std::memory_order_relaxed)) return block_ + at;
    }
    return ::operator new(n, std::align_val_t(align));
  }
  void do_deallocate(void* p, std::size_t, std::size_t align) override {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c >= block_ && c < block_ + capacity_) return;
    ::operator delete(p, std::align_val_t(align));
  }
  bool do_is_equal(const boost::json::memory_resource& other) const noexcept override {
    return this == &other;
  }

  unsigned char* const block_;
  const std::size_t capacity_;
  std::atomic<std::size_t> used_{0};
};

struct ThreadScratch {
  alignas(std::max_align_t) unsigned char bytes[8192];
  bool in_use = false;
};

}  // namespace

// Counts what is allocated through it and takes it from a monotonic arena over the thread's
// scratch block (the heap beyond it, or for a nested ScratchJson).
struct ScratchJson::counting final : boost::json::memory_resource {
  boost::json::monotonic_resource arena;
  std::size_t needed = 0;
  counting(unsigned char* block, std::size_t size) : arena(block, size) {}
  counting() = default;
  void* do_allocate(std::size_t n, std::size_t align) override {
    // As packed_resource's bump allocation lays them out: a copy makes the same allocations in
    // the same order (a reserved object, then each key and value in turn). Where it does not,
    // what does not fit comes from the heap.
    needed = ((needed + align - 1) & ~(align - 1)) + n;
    return arena.allocate(n, align);
  }
  void do_deallocate(void*, std::size_t, std::size_t) override {}
  bool do_is_equal(const boost::json::memory_resource& other) const noexcept override {
    return this == &other;
  }
};

namespace {
ThreadScratch& thread_scratch() {
  thread_local ThreadScratch s;
  return s;
}
}  // namespace

ScratchJson::ScratchJson() {
  auto& s = thread_scratch();
  if (!s.in_use) {
    s.in_use = owns_block_ = true;
    counting_ = std::make_unique<counting>(s.bytes, sizeof s.bytes);
  } else {
    counting_ = std::make_unique<counting>();
  }
  storage_ = boost::json::storage_ptr(counting_.get());
}

ScratchJson::~ScratchJson() {
  storage_ = {};
  counting_.reset();
  if (owns_block_) thread_scratch().in_use = false;
}

std::size_t ScratchJson::needed() const noexcept { return counting_->needed; }

std::shared_ptr<const boost::json::value> packed_copy(const boost::json::value& v, std::size_t needed) {
  return std::make_shared<const boost::json::value>(
      v, boost::json::make_shared_resource<packed_resource>(needed));
}

namespace {
template <class T>
std::shared_ptr<const boost::json::value> pack(const T& t) {
  ScratchJson scratch;
  const boost::json::value v(to_json(t, scratch.storage()));
  return packed_copy(v, scratch.needed());
}
}  // namespace

std::shared_ptr<const boost::json::value> packed_json(const Booking& b) { return pack(b); }
std::shared_ptr<const boost::json::value> packed_json(const ResourceState& r) { return pack(r); }

}  // namespace pushbook::detail
