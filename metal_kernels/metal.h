// Metal side of the shared kernel vocabulary (MLX prepends <metal_stdlib> and its utils).
#define GPU_FN inline

GPU_FN float gpu_exp(float x) { return metal::precise::exp(x); }
GPU_FN float gpu_log(float x) { return metal::precise::log(x); }
GPU_FN float gpu_rsqrt(float x) { return metal::precise::rsqrt(x); }
GPU_FN float gpu_fmax(float a, float b) { return metal::fmax(a, b); }
GPU_FN float gpu_fabs(float x) { return metal::fabs(x); }
GPU_FN float gpu_as_float(uint u) { return as_type<float>(u); }  // MLX's headers use namespace metal
GPU_FN float gpu_simd_sum(float x) { return metal::simd_sum(x); }
GPU_FN float gpu_shfl_xor(float x, int offset) { return metal::simd_shuffle_xor(x, ushort(offset)); }
GPU_FN float gpu_shfl(float x, int lane) { return metal::simd_shuffle(x, ushort(lane)); }

// Four consecutive 32-bit words of a device buffer in one 16-byte load (i: the first word's index, a multiple of 4;
// MLX's buffers start 16-byte aligned), and word w (0..3) of them.
GPU_FN uint4 gpu_load4(const device uint* p, size_t i) { return *reinterpret_cast<const device uint4*>(p + i); }
GPU_FN uint gpu_word(uint4 v, int w) { return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w; }
// Eight consecutive values of a device buffer (i a multiple of 8, the buffer 16-byte aligned) as floats, read as
// one 16-byte load for 2-byte types (two for float), not eight: 2-byte values (bfloat16_t, half) converted from
// their bits.
GPU_FN void gpu_load8(const device float* p, size_t i, thread float* out) {
  const float4 a = *reinterpret_cast<const device float4*>(p + i);
  const float4 b = *reinterpret_cast<const device float4*>(p + i + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
template <typename T>
GPU_FN void gpu_load8(const device T* p, size_t i, thread float* out) {
  const uint4 v = *reinterpret_cast<const device uint4*>(p + i);
  for (int j = 0; j < 8; ++j) {
    const uint word = gpu_word(v, j / 2);
    out[j] = static_cast<float>(as_type<T>(static_cast<ushort>(j % 2 == 0 ? word & 0xffffu : word >> 16)));
  }
}

// Threadgroup shared memory and the barrier over the whole group.
#define GPU_SHARED threadgroup
GPU_FN void gpu_barrier() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }

// Store a float into a buffer of the kernel's output type (bfloat16_t, half or float).
template <typename T>
GPU_FN void gpu_store(device T* p, size_t i, float v) { p[i] = static_cast<T>(v); }
// v rounded to the element type of buffer p (and back to float).
template <typename T>
GPU_FN float gpu_round_as(device T* p, float v) { return static_cast<float>(static_cast<T>(v)); }
