// Metal's built-ins for a parse of Metal text as C++ for OpenCL by libclang (tests/metal_check.py), so the
// check is as strict as Metal where g++ is not:
// - device / constant / threadgroup are OpenCL's __global / __constant / __local: real, distinct address
//   spaces (a constant buffer handed to a device pointer, or a shared array to a plain one, is an error), with
//   the generic address space off (Metal has none: an unqualified pointer is a thread one).
// - half is OpenCL's half keyword and bfloat expands to clang's __bf16 keyword, so neither can name a
//   variable; the vector and other Metal type names are typedefs here, and metal_check.py rejects any
//   declaration that reuses one of them.
// MLX prepends <metal_stdlib> and `using namespace metal;` to every kernel: the functions our kernels call
// are declared in namespace metal below, and the namespace is used.
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
#define bfloat __bf16
typedef unsigned int uint;
typedef unsigned long ulong;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long size_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef half float16_t;
typedef bfloat bfloat16_t;
typedef unsigned int uint2 __attribute__((ext_vector_type(2)));
typedef unsigned int uint3 __attribute__((ext_vector_type(3)));
typedef unsigned int uint4 __attribute__((ext_vector_type(4)));
typedef int int2 __attribute__((ext_vector_type(2)));
typedef int int3 __attribute__((ext_vector_type(3)));
typedef int int4 __attribute__((ext_vector_type(4)));
typedef float float2 __attribute__((ext_vector_type(2)));
typedef float float3 __attribute__((ext_vector_type(3)));
typedef float float4 __attribute__((ext_vector_type(4)));
typedef half half2 __attribute__((ext_vector_type(2)));
typedef half half4 __attribute__((ext_vector_type(4)));
typedef unsigned long ulong2 __attribute__((ext_vector_type(2)));
namespace metal {
template <typename T, typename U>
T as_type(U);
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
void simdgroup_barrier(mem_flags);
typedef float simdgroup_float8x8 __attribute__((ext_vector_type(2)));  // opaque: a lane's share of the 8x8
template <typename T, int R, int C>
simdgroup_float8x8 make_filled_simdgroup_matrix(T);
void simdgroup_load(__private simdgroup_float8x8&, const __local float*, ulong = 8, ulong2 = ulong2(0), bool = false);
void simdgroup_store(simdgroup_float8x8, __local float*, ulong = 8, ulong2 = ulong2(0), bool = false);
void simdgroup_multiply_accumulate(__private simdgroup_float8x8&, simdgroup_float8x8, simdgroup_float8x8,
                                   simdgroup_float8x8);
}  // namespace metal
using namespace metal;
