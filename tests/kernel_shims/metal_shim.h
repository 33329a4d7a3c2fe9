// Declares the Metal built-ins our kernels use, so g++ can check Metal text as C++ (syntax and
// names only; the CUDA twin on a GPU checks behaviour). Used by tests/test_kernels_static.py.
#pragma once
#include <cstddef>
#include <cstdint>
#define device
#define constant
#define threadgroup
#define kernel
typedef unsigned int uint;
typedef unsigned short ushort;
typedef _Float16 half;
typedef _Float16 float16_t;
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };
struct float4 { float x, y, z, w; };
struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
};
template <typename T, typename U>
T as_type(U);
namespace metal {
float exp(float);
float log(float);
float rsqrt(float);
float fmax(float, float);
float fabs(float);
float simd_sum(float);
float simd_shuffle_xor(float, ushort);
float simd_shuffle(float, ushort);
namespace precise {
float exp(float);
float log(float);
float rsqrt(float);
}  // namespace precise
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
}  // namespace metal
