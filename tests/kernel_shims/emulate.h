// Runs generated Metal or CUDA kernel text on the CPU, so the shared algorithm bodies can be checked for
// behaviour without a GPU (tests/kernel_emulator.py).
//
// Each GPU thread of a threadgroup is a fiber (ucontext) on the launching OS thread, and a cooperative
// scheduler runs exactly one of them at a time: a fiber runs until it reaches a barrier (the threadgroup's
// barrier, or its 32-lane group's barrier inside a shuffle) or ends, and then the next fiber is drawn at random
// (a seeded std::mt19937, so a launch is reproducible) from those that can run. Between two barriers the
// threads of a group thus run in a shuffled order: a read of shared memory that no barrier orders after its
// write sees the write or not depending on the order, and its test fails.
//
// Threadgroup memory is the kernel's function-local statics (GPU_SHARED: threadgroup / __shared__ ->
// static): groups run one after another, and before each group starts the launcher fills every such static
// with junk (all bytes 0xFF: float NaN, int -1), as a GPU leaves it; the launcher is told where they are
// (tests/kernel_emulator.py reads their addresses from the library's symbol table, because GCC ignores a
// section attribute on the statics of a function template, which every Metal kernel is).
#pragma once
#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <random>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};

// A 32-lane group: the values lanes exchange in a shuffle, and its barrier. size counts the lanes that exist
// (a Metal threadgroup cut by the grid's edge may end in a partial group); a lane that does not exist never
// writes v, which holds junk (NaN) for it.
struct EmuWarp {
  float v[32];
  unsigned size = 0, arrived = 0;
  unsigned waiting[32];
};

struct EmuThread {
  ucontext_t ctx;
  uint3 tid, gid;  // position in the threadgroup, position in the grid
  unsigned lane;
  EmuWarp* warp;
};

// One launch's scheduler state. Only the running fiber or the scheduler (between fibers) touches it.
struct EmuSched {
  std::vector<EmuThread> threads;  // the current group's threads that exist, in linear order
  std::vector<EmuWarp> warps;
  std::vector<unsigned> runnable;  // threads that may run: not at a barrier that has not released, not ended
  std::vector<unsigned> at_block;  // threads waiting at the threadgroup barrier
  unsigned cur = 0, ended = 0;
  std::mt19937 rng;
  ucontext_t main;  // the scheduler's own context (the launching thread's stack)
  uint3 block_idx, block_dim;
  void (*entry)() = nullptr;  // runs the kernel for threads[cur]
};
inline thread_local EmuSched* emu_s = nullptr;

inline EmuThread& emu_me() { return emu_s->threads[emu_s->cur]; }

// The running thread has been put at a barrier or has ended: run a thread drawn from the runnable ones, or
// return to the scheduler when none is (the group is done, or its threads wait at barriers that cannot
// release: a deadlock). save: the context to resume this thread from later (null for an ended thread).
inline void emu_switch(ucontext_t* save) {
  EmuSched& s = *emu_s;
  if (s.runnable.empty()) {
    if (save) swapcontext(save, &s.main);
    else setcontext(&s.main);
    return;
  }
  const unsigned k = s.rng() % s.runnable.size();
  const unsigned next = s.runnable[k];
  s.runnable[k] = s.runnable.back();
  s.runnable.pop_back();
  if (save && next == s.cur) return;  // drawn again (a barrier it released): carry on
  s.cur = next;
  if (save) swapcontext(save, &s.threads[next].ctx);
  else setcontext(&s.threads[next].ctx);
}

// The whole threadgroup's barrier: releases when every thread of the group that exists has arrived.
inline void emu_block_barrier() {
  EmuSched& s = *emu_s;
  const unsigned me = s.cur;
  s.at_block.push_back(me);
  if (s.at_block.size() == s.threads.size()) {
    s.runnable.insert(s.runnable.end(), s.at_block.begin(), s.at_block.end());
    s.at_block.clear();
  }
  emu_switch(&s.threads[me].ctx);
}

// The 32-lane group's barrier (inside a shuffle): releases when every lane of the group that exists arrived.
inline void emu_warp_barrier() {
  EmuSched& s = *emu_s;
  const unsigned me = s.cur;
  EmuWarp& w = *s.threads[me].warp;
  w.waiting[w.arrived++] = me;
  if (w.arrived == w.size) {
    s.runnable.insert(s.runnable.end(), w.waiting, w.waiting + w.size);
    w.arrived = 0;
  }
  emu_switch(&s.threads[me].ctx);
}

inline float emu_shfl(float x, int src) {
  EmuThread& t = emu_me();
  EmuWarp& w = *t.warp;
  w.v[t.lane] = x;
  emu_warp_barrier();  // every lane has written its value
  const float y = w.v[src & 31];
  emu_warp_barrier();  // every lane has read before the next shuffle overwrites v
  return y;
}

inline float emu_shfl_xor(float x, int offset) { return emu_shfl(x, int(emu_me().lane) ^ (offset & 31)); }

inline void emu_fiber() {
  emu_s->entry();
  ++emu_s->ended;
  emu_switch(nullptr);
}

// Runs every threadgroup of a launch: 0 when all threads ended, 1 on a deadlock (the runnable threads ran
// out while some had not ended: threads of a group wait at different barriers, or at one that others of the
// group never reach). grid: threads (Metal, dispatchThreads: ceil(grid / group) groups per axis, the last one
// along an axis holding only the threads inside the grid) or, for CUDA, ceil(grid / group) whole blocks
// (threads beyond the grid run too). shared: (address, bytes) of each threadgroup array, filled with junk
// before each group starts.
inline int emu_run(void (*entry)(), bool cuda, const unsigned grid[3], const unsigned group[3], unsigned seed,
                   char* const* shared_at, const unsigned long* shared_bytes, unsigned n_shared) {
  constexpr size_t STACK = size_t(1) << 20, GUARD = 4096;  // a fiber's stack, and a no-access page below it
  const unsigned n = group[0] * group[1] * group[2];
  char* stacks = static_cast<char*>(mmap(nullptr, n * (STACK + GUARD), PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) return 2;
  for (unsigned i = 0; i < n; ++i) mprotect(stacks + i * (STACK + GUARD), GUARD, PROT_NONE);
  EmuSched s;
  s.rng.seed(seed);
  s.entry = entry;
  s.threads.reserve(n);
  s.runnable.reserve(n);
  s.at_block.reserve(n);
  EmuSched* const outer = emu_s;
  emu_s = &s;
  int status = 0;
  unsigned blocks[3];
  for (int a = 0; a < 3; ++a) blocks[a] = (grid[a] + group[a] - 1) / group[a];
  for (unsigned bz = 0; bz < blocks[2] && !status; ++bz)
    for (unsigned by = 0; by < blocks[1] && !status; ++by)
      for (unsigned bx = 0; bx < blocks[0] && !status; ++bx) {
        const unsigned b[3] = {bx, by, bz};
        unsigned dim[3];  // the group's threads along each axis
        for (int a = 0; a < 3; ++a) dim[a] = cuda ? group[a] : std::min(group[a], grid[a] - b[a] * group[a]);
        const unsigned count = dim[0] * dim[1] * dim[2];
        s.block_idx = {bx, by, bz};
        s.block_dim = {group[0], group[1], group[2]};
        s.threads.resize(count);
        s.warps.assign((count + 31) / 32, EmuWarp{});
        for (unsigned w = 0; w < s.warps.size(); ++w) {
          s.warps[w].size = std::min(32u, count - 32 * w);
          std::memset(s.warps[w].v, 0xFF, sizeof s.warps[w].v);
        }
        for (unsigned i = 0; i < n_shared; ++i) std::memset(shared_at[i], 0xFF, shared_bytes[i]);
        s.runnable.clear();
        s.at_block.clear();
        s.ended = 0;
        for (unsigned t = 0; t < count; ++t) {
          EmuThread& th = s.threads[t];
          const unsigned x = t % dim[0], y = (t / dim[0]) % dim[1], z = t / (dim[0] * dim[1]);
          th.tid = {x, y, z};
          th.gid = {bx * group[0] + x, by * group[1] + y, bz * group[2] + z};
          th.lane = t % 32;
          th.warp = &s.warps[t / 32];
          getcontext(&th.ctx);
          th.ctx.uc_stack.ss_sp = stacks + t * (STACK + GUARD) + GUARD;
          th.ctx.uc_stack.ss_size = STACK;
          th.ctx.uc_link = nullptr;  // a fiber never returns: emu_fiber switches away when the kernel ends
          makecontext(&th.ctx, emu_fiber, 0);
          s.runnable.push_back(t);
        }
        const unsigned first = s.rng() % count;  // the group's first thread; the rest are drawn as they switch
        s.runnable[first] = s.runnable.back();
        s.runnable.pop_back();
        s.cur = first;
        swapcontext(&s.main, &s.threads[first].ctx);  // back here when no thread can run
        if (s.ended != count) status = 1;
      }
  emu_s = outer;
  munmap(stacks, n * (STACK + GUARD));
  return status;
}

struct emu_bf16 {
  uint16_t bits;
  emu_bf16() = default;
  emu_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    bits = uint16_t(u >> 16);
  }
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

#ifdef EMU_CUDA
#define __global__
#define __device__
#define __forceinline__ inline
typedef emu_bf16 __nv_bfloat16;
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
// The running thread's ids (the scheduler switches the current thread; the kernel reads these as values).
#define threadIdx (emu_me().tid)
#define blockIdx (emu_s->block_idx)
#define blockDim (emu_s->block_dim)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __shfl_xor_sync(unsigned int, float x, int offset) { return emu_shfl_xor(x, offset); }
inline float __shfl_sync(unsigned int, float x, int src) { return emu_shfl(x, src); }
inline void __syncthreads() { emu_block_barrier(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu_warp_barrier(); }
#define __shared__ static
namespace cooperative_groups {}
#else
#define device
#define constant
#define kernel
#define threadgroup static
#define GPU_SHARED_ARG
#define thread
typedef unsigned long ulong;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef emu_bf16 bfloat16_t;
template <typename T, typename U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U));
  T t;
  std::memcpy(&t, &u, sizeof t);
  return t;
}
namespace metal {
inline float fmax(float a, float b) { return std::fmax(a, b); }
inline float fabs(float x) { return std::fabs(x); }
inline float simd_shuffle_xor(float x, unsigned short offset) { return emu_shfl_xor(x, offset); }
inline float simd_shuffle(float x, unsigned short src) { return emu_shfl(x, src); }
inline float simd_sum(float x) {
  for (int offset = 1; offset < 32; offset <<= 1) x += emu_shfl_xor(x, offset);
  return x;
}
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
inline void threadgroup_barrier(mem_flags) { emu_block_barrier(); }
inline void simdgroup_barrier(mem_flags) { emu_warp_barrier(); }

namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
}  // namespace metal
// simdgroup_matrix: every lane holds the whole 8x8 matrix (the hardware spreads it over the lanes; the results
// are the same). Loads, stores and products are collective, as on the GPU: each waits for the whole group first.
// A store writes only the lane's share (element i by lane i % 32), as the hardware does: a lane reading the stored
// tile before the group's simdgroup_barrier reads what other lanes have not written yet.
struct simdgroup_float8x8 {
  float v[64];
};
template <typename T, int R, int C>
inline simdgroup_float8x8 make_filled_simdgroup_matrix(T x) {
  simdgroup_float8x8 m;
  for (float& e : m.v) e = x;
  return m;
}
struct ulong2 {
  unsigned long x, y;
  explicit ulong2(unsigned long a) : x(a), y(a) {}
};
inline void simdgroup_load(simdgroup_float8x8& d, const float* src, unsigned long per_row = 8,
                           ulong2 origin = ulong2(0), bool transpose = false) {
  emu_warp_barrier();
  src += origin.y * per_row + origin.x;
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) d.v[r * 8 + c] = transpose ? src[c * per_row + r] : src[r * per_row + c];
}
inline void simdgroup_store(simdgroup_float8x8 a, float* dst, unsigned long per_row = 8,
                            ulong2 origin = ulong2(0), bool transpose = false) {
  emu_warp_barrier();
  dst += origin.y * per_row + origin.x;
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c)
      if ((r * 8 + c) % 32 == int(emu_me().lane))
        (transpose ? dst[c * per_row + r] : dst[r * per_row + c]) = a.v[r * 8 + c];
}
inline void simdgroup_multiply_accumulate(simdgroup_float8x8& d, const simdgroup_float8x8& a,
                                          const simdgroup_float8x8& b, const simdgroup_float8x8& c) {
  simdgroup_float8x8 out;
  for (int r = 0; r < 8; ++r)
    for (int n = 0; n < 8; ++n) {
      float s = c.v[r * 8 + n];
      for (int k = 0; k < 8; ++k) s += a.v[r * 8 + k] * b.v[k * 8 + n];
      out.v[r * 8 + n] = s;
    }
  d = out;
}
#endif
