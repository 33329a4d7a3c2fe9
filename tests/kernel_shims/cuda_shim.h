// Declares the CUDA built-ins our kernels use, so g++ can check CUDA text as C++ (syntax and
// names only; the GPU run checks behaviour). Used by tests/test_kernels_static.py.
#pragma once
#include <cstddef>
#include <cstdint>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__
#define __grid_constant__
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct uint4 { unsigned int x, y, z, w; };
uint3 make_uint3(unsigned int, unsigned int, unsigned int);
extern const uint3 threadIdx;
extern const uint3 blockIdx;
extern const dim3 blockDim;
struct __nv_bfloat16 {
  __nv_bfloat16() = default;
  __nv_bfloat16(float);
  operator float() const;
};
struct __half {
  __half() = default;
  __half(float);
  operator float() const;
};
float expf(float);
float logf(float);
float rsqrtf(float);
float fmaxf(float, float);
float fabsf(float);
float __uint_as_float(unsigned int);
float __shfl_xor_sync(unsigned int, float, int);
float __shfl_sync(unsigned int, float, int);
void __syncthreads();
void __syncwarp(unsigned int = 0xffffffffu);
namespace cooperative_groups {}
