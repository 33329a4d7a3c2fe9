// CUDA side of the shared kernel vocabulary (MLX prepends its device utils and cooperative_groups).
#define KDA_FN __device__ __forceinline__

KDA_FN float kda_exp(float x) { return expf(x); }
KDA_FN float kda_log(float x) { return logf(x); }
KDA_FN float kda_rsqrt(float x) { return rsqrtf(x); }
KDA_FN float kda_fmax(float a, float b) { return fmaxf(a, b); }
KDA_FN float kda_fabs(float x) { return fabsf(x); }
KDA_FN float kda_as_float(unsigned int u) { return __uint_as_float(u); }

// Sum over the 32 lanes of a warp (the kernels run whole warps along x).
KDA_FN float kda_simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

KDA_FN float kda_shfl_xor(float x, int offset) { return __shfl_xor_sync(0xffffffffu, x, offset); }
KDA_FN float kda_shfl(float x, int lane) { return __shfl_sync(0xffffffffu, x, lane); }

// Four consecutive words of p from word i in one 16-byte load (p + i 16-byte aligned).
KDA_FN uint4 kda_load4(const uint32_t* p, size_t i) { return *reinterpret_cast<const uint4*>(p + i); }

// Threadgroup ("block") shared memory and the barrier over the whole group.
#define KDA_SHARED __shared__
KDA_FN void kda_barrier() { __syncthreads(); }

// Store a float into a buffer of the kernel's output type (__nv_bfloat16, __half or float).
template <typename T>
KDA_FN void kda_store(T* p, size_t i, float v) { p[i] = static_cast<T>(v); }
// v rounded to the element type of buffer p (and back to float).
template <typename T>
KDA_FN float kda_round_as(T* p, float v) { return static_cast<float>(static_cast<T>(v)); }
