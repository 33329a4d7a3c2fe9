// Metal side of the shared kernel vocabulary (MLX prepends <metal_stdlib> and its utils).
#define KDA_FN inline

KDA_FN float kda_exp(float x) { return metal::precise::exp(x); }
KDA_FN float kda_log(float x) { return metal::precise::log(x); }
KDA_FN float kda_rsqrt(float x) { return metal::precise::rsqrt(x); }
KDA_FN float kda_fmax(float a, float b) { return metal::fmax(a, b); }
KDA_FN float kda_fabs(float x) { return metal::fabs(x); }
KDA_FN float kda_as_float(uint u) { return as_type<float>(u); }  // MLX's headers use namespace metal
KDA_FN float kda_simd_sum(float x) { return metal::simd_sum(x); }
KDA_FN float kda_shfl_xor(float x, int offset) { return metal::simd_shuffle_xor(x, ushort(offset)); }
KDA_FN float kda_shfl(float x, int lane) { return metal::simd_shuffle(x, ushort(lane)); }

// Four consecutive words of p from word i (p a device or constant buffer: MLX passes inputs of fewer than 8
// elements in the constant address space), as four adjacent loads for the compiler to merge.
template <typename P>
KDA_FN uint4 kda_load4(P p, size_t i) {
  uint4 q;
  q.x = p[i];
  q.y = p[i + 1];
  q.z = p[i + 2];
  q.w = p[i + 3];
  return q;
}

// Threadgroup shared memory and the barrier over the whole group.
#define KDA_SHARED threadgroup
KDA_FN void kda_barrier() { metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup); }

// Store a float into a buffer of the kernel's output type (bfloat16_t, half or float).
template <typename T>
KDA_FN void kda_store(device T* p, size_t i, float v) { p[i] = static_cast<T>(v); }
// v rounded to the element type of buffer p (and back to float).
template <typename T>
KDA_FN float kda_round_as(device T* p, float v) { return static_cast<float>(static_cast<T>(v)); }
