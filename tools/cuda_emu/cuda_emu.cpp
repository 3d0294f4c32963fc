// The runtime of the CUDA emulation (cuda_emu.h states the model): the thread pool that runs a
// block's threads, the block barrier, the warp collectives, shared memory, and the launch log.
//
// Locking: all emulator state of a block sits under one mutex (Block::m). Under
// ThreadSanitizer the emulator's own synchronisation and bookkeeping are invisible (Quiet:
// AnnotateIgnoreSync/Reads/Writes), and happens-before edges are added explicitly
// (__tsan_release / __tsan_acquire) exactly where CUDA orders memory: launch start, the end of a
// __syncthreads / __syncwarp, launch end.
#include "cuda_emu.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <vector>

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

#if defined(__SANITIZE_THREAD__)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* f, int l);
void AnnotateIgnoreSyncEnd(const char* f, int l);
void AnnotateIgnoreReadsBegin(const char* f, int l);
void AnnotateIgnoreReadsEnd(const char* f, int l);
void AnnotateIgnoreWritesBegin(const char* f, int l);
void AnnotateIgnoreWritesEnd(const char* f, int l);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

namespace emu {
namespace {

#if defined(__SANITIZE_THREAD__)
// The emulator's own locks and data: no happens-before, no race checks.
struct Quiet {
  Quiet() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
  }
  Quiet(const Quiet&) = delete;
};
void hb_release(const void* a) { __tsan_release(const_cast<void*>(a)); }
void hb_acquire(const void* a) { __tsan_acquire(const_cast<void*>(a)); }
#else
struct Quiet {
  Quiet() {}
  Quiet(const Quiet&) = delete;
};
void hb_release(const void*) {}
void hb_acquire(const void*) {}
#endif

constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDynamicSharedLimit = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kStackBytes = 1 << 20;

// A thread parks on its own futex word and is woken by whoever completes what it waits for:
// no mutex to re-acquire on wake-up (a block's 256 threads would contend for it).
struct Parker {
  std::atomic<uint32_t> seq{0};

  uint32_t ticket() const { return seq.load(std::memory_order_acquire); }
  void wait(uint32_t t) {
    while (seq.load(std::memory_order_acquire) == t)
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&seq), FUTEX_WAIT_PRIVATE, t, nullptr,
              nullptr, 0);
  }
  void wake() {
    seq.fetch_add(1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&seq), FUTEX_WAKE_PRIVATE, 1, nullptr,
            nullptr, 0);
  }
};

const char* collective_name(int kind) {
  switch (kind) {
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    case kAny: return "__any_sync";
    case kAll: return "__all_sync";
    case kSyncWarp: return "__syncwarp";
    case kReduceAddU: case kReduceAddI: return "__reduce_add_sync";
    case kReduceMinU: case kReduceMinI: return "__reduce_min_sync";
    case kReduceMaxU: case kReduceMaxI: return "__reduce_max_sync";
    case kReduceAnd: return "__reduce_and_sync";
    case kReduceOr: return "__reduce_or_sync";
    case kReduceXor: return "__reduce_xor_sync";
  }
  return "?";
}

std::string where(const Loc& l) {
  std::string f = l.file_name();
  const auto slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(l.line());
}

bool same_site(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         std::strcmp(a.file_name(), b.file_name()) == 0;
}

std::string hex(uint32_t m) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", m);
  return buf;
}

std::string lanes_of(uint32_t m) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if ((m >> l) & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return "{" + s + "}";
}

// One warp collective in progress (kept until the block ends).
struct Group {
  int kind;
  uint32_t mask;
  int size, width;
  Loc loc;
  uint32_t arrived = 0;
  bool done = false;
  uint64_t in[32] = {};
  int b[32] = {};
  uint64_t out[32] = {};
};

struct Warp {
  std::vector<Group*> open;
  uint32_t exited = 0;  // lanes that exited, or do not exist (a partial last warp)
  std::atomic<uint64_t> sw_gen{0};
  char sw_tok[2] = {};  // happens-before tokens of __syncwarp, by generation parity
};

enum ThreadState : int { kRunning, kAtBarrier, kInCollective, kExited };

struct ThreadInfo {
  int state = kRunning;
  int kind = 0;
  Loc loc;
  Parker park;
};

struct Block {
  std::mutex m;
  uint3 idx;
  dim3 dim, grid;
  int n;
  std::string kernel;  // __PRETTY_FUNCTION__ of the kernel (kernel_entry)
  int live, blocked = 0;
  std::atomic<bool> aborted{false};
  std::string error;
  // __syncthreads
  int bar_count = 0, bar_pred = 0, bar_kind = 0;
  int bar_result[2] = {0, 0};
  std::atomic<uint64_t> bar_gen{0};
  Loc bar_loc;
  char bar_tok[2] = {};
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<ThreadInfo[]> threads;
  std::vector<std::unique_ptr<Group>> groups;
  // shared memory
  std::vector<std::pair<const void*, void*>> statics;
  size_t static_bytes = 0;
  void* dyn = nullptr;
  size_t dyn_bytes = 0;

  ~Block() {
    for (auto& s : statics) std::free(s.second);
    std::free(dyn);
  }
};

struct Ctx {
  Block* b = nullptr;
  int tid = 0, warp = 0, lane = 0;
};
thread_local Ctx t_ctx;

std::string thread_name(const Block& b, int tid) {
  const unsigned x = tid % b.dim.x, y = (tid / b.dim.x) % b.dim.y, z = tid / (b.dim.x * b.dim.y);
  std::ostringstream s;
  s << "thread (" << x << "," << y << "," << z << ") [warp " << tid / 32 << " lane " << tid % 32
    << "]";
  return s.str();
}

std::string block_name(const Block& b) {
  std::ostringstream s;
  s << "block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << ")";
  return s.str();
}

// Records the block's first error and wakes every waiter (they unwind). Under b.m.
void fail_locked(Block& b, const std::string& msg) {
  if (!b.aborted) {
    b.aborted = true;
    b.error = msg;
  }
  for (int t = 0; t < b.n; ++t)
    if (b.threads[t].state == kAtBarrier || b.threads[t].state == kInCollective) {
      b.threads[t].state = kRunning;
      b.threads[t].park.wake();
    }
}

[[noreturn]] void fail_thread(Block& b, const std::string& msg) {
  fail_locked(b, block_name(b) + " " + thread_name(b, t_ctx.tid) + ": " + msg);
  throw Abort{};
}

// Where the live threads wait, grouped by site.
std::string waiting_summary(const Block& b) {
  std::map<std::string, int> sites;
  for (int i = 0; i < b.n; ++i) {
    const ThreadInfo& t = b.threads[i];
    if (t.state == kAtBarrier) sites["__syncthreads at " + where(t.loc)]++;
    if (t.state == kInCollective) sites[std::string(collective_name(t.kind)) + " at " + where(t.loc)]++;
  }
  std::string s;
  for (auto& [k, v] : sites) s += (s.empty() ? "" : "; ") + std::to_string(v) + " in " + k;
  return s;
}

// Every live thread waits on something that cannot complete.
void check_deadlock(Block& b) {
  if (b.live > 0 && b.blocked == b.live)
    fail_thread(b, "deadlock: every live thread of the block waits (" + waiting_summary(b) +
                       ") and no barrier or warp collective can complete");
}

// ------------------------------------------------------------------------------ thread pool

struct Job {
  Block* block = nullptr;
  const std::function<void()>* body = nullptr;
  int n = 0, rot = 0, tid = 0;
};

void run_thread(const Job& j, int tid);
struct Pool;

struct Worker {
  Parker park;
  Job job;
  Pool* pool = nullptr;
};

struct Pool {
  std::vector<std::unique_ptr<Worker>> workers;
  std::vector<pthread_t> threads;
  std::atomic<int> remaining{0};
  std::atomic<bool> stop{false};
  Parker done;

  static void* main(void* arg);

  void grow(int n) {
    while (int(workers.size()) < n) {
      workers.push_back(std::make_unique<Worker>());
      workers.back()->pool = this;
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, kStackBytes);
      pthread_t t;
      const int rc = pthread_create(&t, &attr, &Pool::main, workers.back().get());
      pthread_attr_destroy(&attr);
      if (rc != 0) {
        workers.pop_back();
        throw Error("cuda_emu: pthread_create failed (" + std::to_string(rc) + ")");
      }
      threads.push_back(t);
    }
  }

  // Runs threads [0, j.n) of a block; worker w takes thread (w - rot) mod size, so the same thread
  // index lands on different OS threads in consecutive blocks (ThreadSanitizer then sees the
  // accesses of different blocks as coming from different threads).
  void run(Job j) {
    Quiet q;
    grow(j.n);
    const int size = int(workers.size());
    j.rot %= size;
    remaining.store(j.n, std::memory_order_relaxed);
    for (int w = 0; w < size; ++w) {
      const int tid = (w - j.rot + size) % size;
      if (tid >= j.n) continue;
      workers[w]->job = j;
      workers[w]->job.tid = tid;
      workers[w]->park.wake();
    }
    for (;;) {
      const uint32_t t = done.ticket();
      if (remaining.load(std::memory_order_acquire) == 0) break;
      done.wait(t);
    }
  }

  void worker(Worker& me) {
    uint32_t seen = 0;
    for (;;) {
      {
        Quiet q;
        me.park.wait(seen);
        seen = me.park.ticket();
        if (stop.load(std::memory_order_acquire)) return;
      }
      run_thread(me.job, me.job.tid);
      {
        Quiet q;
        if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) done.wake();
      }
    }
  }

  ~Pool() {
    {
      Quiet q;
      stop.store(true, std::memory_order_release);
      for (auto& w : workers) w->park.wake();
    }
    for (pthread_t t : threads) pthread_join(t, nullptr);
  }
};

void* Pool::main(void* arg) {
  Worker* w = static_cast<Worker*>(arg);
  w->pool->worker(*w);
  return nullptr;
}

Pool& pool() {
  static Pool p;
  return p;
}

// Happens-before tokens of launches: the host's writes before a launch reach every thread; every
// thread's writes reach the host after the launch.
char g_launch_tok, g_end_tok;

// The launch log (kernels that ran, with their geometry).
std::mutex g_log_m;
std::vector<std::string> g_log;
std::string g_log_text;

void thread_exit(Block& b) {
  Quiet q;
  std::lock_guard lk(b.m);
  Ctx& c = t_ctx;
  Warp& w = *b.warps[c.warp];
  const uint32_t bit = 1u << c.lane;
  b.live--;
  w.exited |= bit;
  b.threads[c.tid].state = kExited;
  if (b.aborted) return;
  const std::string me = block_name(b) + " " + thread_name(b, c.tid);
  if (b.bar_count > 0) {
    fail_locked(b, me + ": divergent __syncthreads: this thread exits while " +
                       std::to_string(b.bar_count) + " thread(s) wait at __syncthreads at " +
                       where(b.bar_loc));
    return;
  }
  for (Group* g : w.open)
    if (g->mask & bit) {
      fail_locked(b, me + ": exits while lanes " + lanes_of(g->arrived) + " wait in " +
                         collective_name(g->kind) + " at " + where(g->loc) + " with mask " +
                         hex(g->mask) + ", which names this lane");
      return;
    }
  if (b.live > 0 && b.blocked == b.live)
    fail_locked(b, me + ": exits, leaving a deadlock: every live thread waits (" +
                       waiting_summary(b) + ")");
}

void run_thread(const Job& j, int tid) {
  Block& b = *j.block;
  t_ctx = Ctx{&b, tid, tid / 32, tid % 32};
  threadIdx = uint3{unsigned(tid % b.dim.x), unsigned((tid / b.dim.x) % b.dim.y),
                    unsigned(tid / (b.dim.x * b.dim.y))};
  blockIdx = b.idx;
  blockDim = b.dim;
  gridDim = b.grid;
  hb_acquire(&g_launch_tok);
  try {
    (*j.body)();
  } catch (const Abort&) {
  } catch (const std::exception& e) {
    Quiet q;
    std::lock_guard lk(b.m);
    fail_locked(b, block_name(b) + " " + thread_name(b, tid) + ": exception: " + e.what());
  } catch (...) {
    Quiet q;
    std::lock_guard lk(b.m);
    fail_locked(b, block_name(b) + " " + thread_name(b, tid) + ": unknown exception");
  }
  thread_exit(b);
  hb_release(&g_end_tok);
  t_ctx = Ctx{};
}

uint64_t mask_bits(uint64_t v, int size) {
  return size >= 8 ? v : (v & ((uint64_t(1) << (8 * size)) - 1));
}

// The results of a complete collective (PTX shfl.sync: c = ((32 - width) << 8) | (up ? 0 : 31)).
void complete(Block& b, Group& g) {
  const uint32_t mask = g.mask;
  if (g.kind <= kShflXor) {
    const int segmask = (32 - g.width) & 31;
    const int cval = g.kind == kShflUp ? 0 : 31;
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int bval = g.b[l] & 31;
      const int max_lane = (l & segmask) | (cval & ~segmask);
      const int min_lane = l & segmask;
      int j = l;
      bool ok = false;
      switch (g.kind) {
        case kShflUp: j = l - bval; ok = j >= max_lane; break;
        case kShflDown: j = l + bval; ok = j <= max_lane; break;
        case kShflXor: j = l ^ bval; ok = j <= max_lane; break;
        default: j = min_lane | (bval & ~segmask); ok = j <= max_lane; break;
      }
      if (!ok) j = l;
      if (!((mask >> j) & 1u)) {
        fail_thread(b, std::string(collective_name(g.kind)) + " at " + where(g.loc) + ": lane " +
                           std::to_string(l) + " reads lane " + std::to_string(j) +
                           ", which is not in the mask " + hex(mask) + " (undefined value)");
      }
      g.out[l] = g.in[j];
    }
    return;
  }
  uint64_t r = 0;
  switch (g.kind) {
    case kBallot: case kAny: case kAll: {
      uint32_t ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && g.in[l]) ballot |= 1u << l;
      r = g.kind == kBallot ? ballot : g.kind == kAny ? (ballot != 0) : (ballot == mask);
      break;
    }
    case kSyncWarp: r = 0; break;
    default: {
      bool first = true;
      uint32_t u = 0;
      int32_t s = 0;
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        const uint32_t v = uint32_t(g.in[l]);
        const int32_t vi = int32_t(v);
        switch (g.kind) {
          case kReduceAddU: u = first ? v : u + v; break;
          case kReduceMinU: u = first ? v : std::min(u, v); break;
          case kReduceMaxU: u = first ? v : std::max(u, v); break;
          case kReduceAddI: u = first ? v : u + v; break;
          case kReduceMinI: s = first ? vi : std::min(s, vi); u = uint32_t(s); break;
          case kReduceMaxI: s = first ? vi : std::max(s, vi); u = uint32_t(s); break;
          case kReduceAnd: u = first ? v : (u & v); break;
          case kReduceOr: u = first ? v : (u | v); break;
          case kReduceXor: u = first ? v : (u ^ v); break;
        }
        first = false;
      }
      r = u;
    }
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) g.out[l] = r;
}

}  // namespace

// ---------------------------------------------------------------------------- device-side API

void fail(const std::string& msg) {
  Block& b = *t_ctx.b;
  Quiet q;
  std::lock_guard lk(b.m);
  fail_thread(b, msg);
}

int syncthreads(int kind, int pred, Loc loc) {
  Ctx& c = t_ctx;
  if (!c.b) throw Error("__syncthreads outside a kernel");
  Block& b = *c.b;
  const uint64_t gen = b.bar_gen.load(std::memory_order_relaxed);
  hb_release(&b.bar_tok[gen & 1]);
  int result = 0;
  {
    Quiet q;
    std::unique_lock lk(b.m);
    if (b.aborted) throw Abort{};
    if (b.live != b.n) {
      std::string gone;
      int k = 0;
      for (int t = 0; t < b.n && k < 4; ++t)
        if (b.threads[t].state == kExited) gone += (k++ ? ", " : "") + thread_name(b, t);
      fail_thread(b, "divergent __syncthreads at " + where(loc) + ": " +
                         std::to_string(b.n - b.live) + " thread(s) of the block have exited (" +
                         gone + (b.n - b.live > 4 ? ", ..." : "") + ") and never reach it");
    }
    if (b.bar_count == 0) {
      b.bar_loc = loc;
      b.bar_kind = kind;
    } else if (!same_site(loc, b.bar_loc) || kind != b.bar_kind) {
      fail_thread(b, "divergent __syncthreads: this thread waits at " + where(loc) + " while " +
                         std::to_string(b.bar_count) + " thread(s) wait at " + where(b.bar_loc));
    }
    b.bar_pred += pred != 0;
    b.bar_count++;
    ThreadInfo& me = b.threads[c.tid];
    if (b.bar_count == b.n) {
      const int r = kind == 1 ? b.bar_pred : kind == 2 ? (b.bar_pred == b.n) : kind == 3 ? (b.bar_pred > 0) : 0;
      b.bar_result[gen & 1] = r;
      b.bar_count = 0;
      b.bar_pred = 0;
      b.blocked -= b.n - 1;
      b.bar_gen.store(gen + 1, std::memory_order_relaxed);
      std::vector<int> wake;
      wake.reserve(b.n);
      for (int t = 0; t < b.n; ++t)
        if (b.threads[t].state == kAtBarrier) {
          b.threads[t].state = kRunning;
          wake.push_back(t);
        }
      result = r;
      lk.unlock();
      for (int t : wake) b.threads[t].park.wake();
    } else {
      const uint32_t ticket = me.park.ticket();
      me.state = kAtBarrier;
      me.loc = loc;
      b.blocked++;
      check_deadlock(b);
      lk.unlock();
      me.park.wait(ticket);
      if (b.aborted.load()) throw Abort{};
      result = b.bar_result[gen & 1];
    }
  }
  hb_acquire(&b.bar_tok[gen & 1]);
  return result;
}

uint64_t warp_collective(int kind, uint32_t mask, uint64_t bits, int size, int bval, int width,
                         Loc loc) {
  Ctx& c = t_ctx;
  if (!c.b) throw Error("warp collective outside a kernel");
  Block& b = *c.b;
  Warp& w = *b.warps[c.warp];
  const uint32_t bit = 1u << c.lane;
  const uint64_t sw_gen = w.sw_gen.load(std::memory_order_relaxed);
  if (kind == kSyncWarp) hb_release(&w.sw_tok[sw_gen & 1]);
  uint64_t result;
  {
    Quiet q;
    std::unique_lock lk(b.m);
    if (b.aborted) throw Abort{};
    const auto what = [&] { return std::string(collective_name(kind)) + " at " + where(loc); };
    if (!(mask & bit))
      fail_thread(b, what() + ": the mask " + hex(mask) + " does not name the calling lane");
    if (mask & w.exited)
      fail_thread(b, what() + ": the mask " + hex(mask) + " names lanes " + lanes_of(mask & w.exited) +
                         " that have exited or do not exist");
    if (kind <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
      fail_thread(b, what() + ": width " + std::to_string(width) +
                         " is not a power of two in [1, 32]");
    Group* g = nullptr;
    for (Group* o : w.open)
      if (o->mask & mask) {
        g = o;
        break;
      }
    if (g) {
      if (g->mask != mask)
        fail_thread(b, what() + " with mask " + hex(mask) + " while lanes " + lanes_of(g->arrived) +
                           " wait in " + collective_name(g->kind) + " at " + where(g->loc) +
                           " with the overlapping mask " + hex(g->mask));
      // (sm_70+: lanes may reach the collective from different call sites)
      if (g->kind != kind || g->size != size || g->width != width)
        fail_thread(b, "divergent warp collective: this lane calls " + what() + " (width " +
                           std::to_string(width) + ") while lanes " + lanes_of(g->arrived) +
                           " wait in " + collective_name(g->kind) + " at " + where(g->loc) +
                           " (width " + std::to_string(g->width) + ")");
    } else {
      b.groups.push_back(std::make_unique<Group>());
      g = b.groups.back().get();
      g->kind = kind;
      g->mask = mask;
      g->size = size;
      g->width = width;
      g->loc = loc;
      w.open.push_back(g);
    }
    g->in[c.lane] = mask_bits(bits, size);
    g->b[c.lane] = bval;
    g->arrived |= bit;
    if (g->arrived == g->mask) {
      complete(b, *g);
      g->done = true;
      w.open.erase(std::find(w.open.begin(), w.open.end(), g));
      b.blocked -= __builtin_popcount(mask) - 1;
      if (kind == kSyncWarp) w.sw_gen.store(sw_gen + 1, std::memory_order_relaxed);
      int wake[32], nw = 0;
      for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && l != c.lane) {
          b.threads[c.warp * 32 + l].state = kRunning;
          wake[nw++] = c.warp * 32 + l;
        }
      result = g->out[c.lane];
      lk.unlock();
      for (int i = 0; i < nw; ++i) b.threads[wake[i]].park.wake();
    } else {
      ThreadInfo& me = b.threads[c.tid];
      const uint32_t ticket = me.park.ticket();
      me.state = kInCollective;
      me.kind = kind;
      me.loc = loc;
      b.blocked++;
      check_deadlock(b);
      lk.unlock();
      me.park.wait(ticket);
      if (b.aborted.load()) throw Abort{};
      result = g->out[c.lane];
    }
  }
  if (kind == kSyncWarp) hb_acquire(&w.sw_tok[sw_gen & 1]);
  return result;
}

uint32_t active_mask() {
  Ctx& c = t_ctx;
  Block& b = *c.b;
  Quiet q;
  std::lock_guard lk(b.m);
  return ~b.warps[c.warp]->exited;
}

void* shared_static(const void* site, size_t size, size_t align, const char* name) {
  Ctx& c = t_ctx;
  if (!c.b) throw Error("__shared__ variable outside a kernel");
  Block& b = *c.b;
  Quiet q;
  std::lock_guard lk(b.m);
  for (auto& s : b.statics)
    if (s.first == site) return s.second;
  void* p = nullptr;
  if (posix_memalign(&p, align, size ? size : 1) != 0) fail_thread(b, "out of host memory");
  std::memset(p, 0xFF, size);  // NaN / -1 / an invalid bool until written
  b.statics.emplace_back(site, p);
  b.static_bytes += size;
  if (b.static_bytes > kStaticSharedLimit)
    fail_thread(b, std::string("static shared memory of the block reaches ") +
                       std::to_string(b.static_bytes) + " bytes with __shared__ " + name +
                       " (the limit is 48 KiB)");
  return p;
}

void* shared_dynamic(size_t align) {
  Ctx& c = t_ctx;
  if (!c.b) throw Error("extern __shared__ outside a kernel");
  Block& b = *c.b;
  if (reinterpret_cast<uintptr_t>(b.dyn) % align != 0)
    fail(std::string("dynamic shared memory is not aligned for the type"));
  return b.dyn;
}

void kernel_entry(const char* pretty, long bounds) {
  Ctx& c = t_ctx;
  if (c.tid != 0) return;
  Block& b = *c.b;
  Quiet q;
  std::lock_guard lk(b.m);
  b.kernel = pretty;
  if (bounds > 0 && b.n > bounds)
    fail_thread(b, "launch of " + std::to_string(b.n) + " threads per block exceeds the kernel's "
                   "__launch_bounds__(" + std::to_string(bounds) + ") (too many resources requested)");
}

// ---------------------------------------------------------------------------------- host side

void run_grid(const char* file, int line, dim3 grid, dim3 block, size_t shmem,
              const std::function<void()>& body) {
  static std::mutex launch_m;
  std::lock_guard launch_lk(launch_m);
  const std::string at = std::string(file) + ":" + std::to_string(line) + ": ";
  const uint64_t n = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || n > 1024 || block.x > 1024 ||
      block.y > 1024 || block.z > 64)
    throw Error(at + "invalid block (" + std::to_string(block.x) + "," + std::to_string(block.y) +
                "," + std::to_string(block.z) + ") (cudaErrorInvalidConfiguration)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535)
    throw Error(at + "invalid grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) +
                "," + std::to_string(grid.z) + ") (cudaErrorInvalidConfiguration)");
  if (shmem > kDynamicSharedLimit)
    throw Error(at + "dynamic shared memory of " + std::to_string(shmem) +
                " bytes exceeds 48 KiB without cudaFuncAttributeMaxDynamicSharedMemorySize");
  hb_release(&g_launch_tok);
  std::string kernel;
  uint64_t blocks = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::unique_ptr<Block> b;
        {
          Quiet q;
          b = std::make_unique<Block>();
          b->idx = uint3{x, y, z};
          b->dim = block;
          b->grid = grid;
          b->n = int(n);
          b->live = int(n);
          const int nwarps = int((n + 31) / 32);
          for (int i = 0; i < nwarps; ++i) {
            b->warps.push_back(std::make_unique<Warp>());
            const int present = std::min(32, int(n) - i * 32);
            b->warps.back()->exited = present == 32 ? 0u : ~((1u << present) - 1u);
          }
          b->threads = std::make_unique<ThreadInfo[]>(n);
          // dynamic shared memory: exactly `shmem` bytes (none addressable without it), NaN
          if (posix_memalign(&b->dyn, 16, shmem) != 0) throw Error(at + "out of host memory");
          if (shmem) std::memset(b->dyn, 0xFF, shmem);
          b->dyn_bytes = shmem;
        }
        pool().run(Job{b.get(), &body, int(n), int((blocks * 97) % 1024)});
        ++blocks;
        std::string err;
        {
          Quiet q;
          std::lock_guard lk(b->m);
          if (kernel.empty()) kernel = b->kernel;
          err = b->error;
        }
        if (!err.empty()) {
          hb_acquire(&g_end_tok);
          Quiet q;
          b.reset();
          throw Error(at + "kernel " + (kernel.empty() ? std::string("?") : kernel) + ": " + err);
        }
        Quiet q;
        b.reset();
      }
  hb_acquire(&g_end_tok);
  std::ostringstream rec;
  rec << kernel << "\tgrid=" << grid.x << "," << grid.y << "," << grid.z << "\tblock=" << block.x
      << "," << block.y << "," << block.z << "\tshmem=" << shmem << "\tat=" << file << ":" << line;
  std::lock_guard lk(g_log_m);
  g_log.push_back(rec.str());
}

}  // namespace emu

// ------------------------------------------------------------------ C ABI for the Python side

extern "C" {

// The launches since the last reset, one per line: kernel \t grid \t block \t shmem \t site.
EMU_API const char* emu_launch_log() {
  std::lock_guard lk(emu::g_log_m);
  emu::g_log_text.clear();
  for (auto& l : emu::g_log) emu::g_log_text += l + "\n";
  return emu::g_log_text.c_str();
}

EMU_API void emu_reset_log() {
  std::lock_guard lk(emu::g_log_m);
  emu::g_log.clear();
}

}  // extern "C"
