// Runs generated Metal or CUDA kernel text on the CPU, one std::thread per GPU thread, so the
// shared algorithm bodies can be checked for behaviour without a GPU (tests/kernel_emulator.py).
// Lanes of a 32-thread group meet at a std::barrier for simd_sum / __shfl_xor_sync.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>

struct EmuGroup {
  float v[32];
  std::barrier<> bar{32};
};
inline thread_local EmuGroup* emu_group = nullptr;
inline thread_local int emu_lane = 0;
// The whole threadgroup's barrier. Groups run one after another, so a static array serves as the
// group's shared memory (KDA_SHARED: __shared__ / threadgroup -> static).
inline thread_local std::barrier<>* emu_block = nullptr;
inline void emu_block_barrier() { emu_block->arrive_and_wait(); }

inline float emu_shfl_xor(float x, int offset) {
  emu_group->v[emu_lane] = x;
  emu_group->bar.arrive_and_wait();
  float y = emu_group->v[emu_lane ^ offset];
  emu_group->bar.arrive_and_wait();
  return y;
}

inline float emu_shfl(float x, int src) {
  emu_group->v[emu_lane] = x;
  emu_group->bar.arrive_and_wait();
  float y = emu_group->v[src];
  emu_group->bar.arrive_and_wait();
  return y;
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

struct uint3 {
  unsigned int x, y, z;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

#ifdef EMU_CUDA
#define __global__
#define __device__
#define __forceinline__ inline
typedef emu_bf16 __nv_bfloat16;
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
inline thread_local uint3 threadIdx, blockIdx, blockDim;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __shfl_xor_sync(unsigned int, float x, int offset) { return emu_shfl_xor(x, offset); }
inline float __shfl_sync(unsigned int, float x, int src) { return emu_shfl(x, src); }
inline void __syncthreads() { emu_block_barrier(); }
#define __shared__ static
namespace cooperative_groups {}
#else
#define device
#define constant
#define kernel
#define threadgroup static
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
namespace precise {
inline float exp(float x) { return std::exp(x); }
inline float log(float x) { return std::log(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
}  // namespace precise
}  // namespace metal
#endif
