// CUDA side of the shared kernel vocabulary (MLX prepends its device utils and cooperative_groups).
#define GPU_FN __device__ __forceinline__

GPU_FN float gpu_exp(float x) { return expf(x); }
GPU_FN float gpu_log(float x) { return logf(x); }
GPU_FN float gpu_rsqrt(float x) { return rsqrtf(x); }
GPU_FN float gpu_fmax(float a, float b) { return fmaxf(a, b); }
GPU_FN float gpu_fabs(float x) { return fabsf(x); }
GPU_FN float gpu_as_float(unsigned int u) { return __uint_as_float(u); }

// Sum over the 32 lanes of a warp (the kernels run whole warps along x).
GPU_FN float gpu_simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

GPU_FN float gpu_shfl_xor(float x, int offset) { return __shfl_xor_sync(0xffffffffu, x, offset); }
GPU_FN float gpu_shfl(float x, int lane) { return __shfl_sync(0xffffffffu, x, lane); }

// Four consecutive 32-bit words of a buffer in one 16-byte load (i: the first word's index, a multiple of 4; MLX's
// buffers start 16-byte aligned), and word w (0..3) of them.
GPU_FN uint4 gpu_load4(const unsigned int* p, size_t i) { return *reinterpret_cast<const uint4*>(p + i); }
GPU_FN unsigned int gpu_word(uint4 v, int w) { return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w; }
// Eight consecutive values of a buffer (i a multiple of 8, the buffer 16-byte aligned) as floats, read as one
// 16-byte load for 2-byte types (two for float), not eight.
template <typename T>
struct alignas(16) gpu_vals8 {
  T v[8];
};
template <typename T>
GPU_FN void gpu_load8(const T* p, size_t i, float* out) {
  const gpu_vals8<T> a = *reinterpret_cast<const gpu_vals8<T>*>(p + i);
  for (int j = 0; j < 8; ++j) out[j] = static_cast<float>(a.v[j]);
}

// Threadgroup ("block") shared memory and the barrier over the whole group.
#define GPU_SHARED __shared__
GPU_FN void gpu_barrier() { __syncthreads(); }

// Store a float into a buffer of the kernel's output type (__nv_bfloat16, __half or float).
template <typename T>
GPU_FN void gpu_store(T* p, size_t i, float v) { p[i] = static_cast<T>(v); }
// v rounded to the element type of buffer p (and back to float).
template <typename T>
GPU_FN float gpu_round_as(T* p, float v) { return static_cast<float>(static_cast<T>(v)); }
