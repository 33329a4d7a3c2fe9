// Matrix-unit tiles for the kernels whose spec asks for them (KernelSpec.tiles): included after cuda.h.
// A 16x16 float32 tile held by one warp, on the tensor cores (mma.sync m16n8k8, TF32 inputs, two n8 halves).
// Its operands and its result live in shared memory, so the kernel text never sees a lane's share of it:
//   gpu_tile16_zero(t);  gpu_tile16_mma_abt(t, a, lda, b, ldb): t += A B^T, A and B 16 rows x 8 columns (row
//   strides lda, ldb floats);  gpu_tile16_store(t, c, ldc): writes t to c (row stride ldc). Every lane of the warp calls them.
// Float32 accuracy from TF32 units: each operand is split x = hi + lo (hi: x rounded to TF32's 10 mantissa bits,
// lo: the rest, rounded again) and A B^T = hi hi + hi lo + lo hi (the lo lo term is below float32's rounding).
// Lane l holds c[4h + e]: row (l / 4) + 8 (e / 2), column 8h + 2 (l % 4) + e % 2 (PTX ISA, m16n8k8 accumulators).
// Without a GPU (the CPU emulator and the C++ syntax check) the same shares are summed from shared memory.
#define GPU_SHARED_ARG
struct gpu_tile16 {
  float c[8];
};
GPU_FN void gpu_tile16_zero(gpu_tile16& t) {
  for (int i = 0; i < 8; ++i) {
    t.c[i] = 0.0f;
  }
}
#if defined(__CUDA_ARCH__)
GPU_FN unsigned int gpu_tf32(float x) {
  unsigned int u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return u;
}
GPU_FN void gpu_mma_tf32(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif
GPU_FN void gpu_tile16_mma_abt(gpu_tile16& t, const float* a, int lda, const float* b, int ldb) {
  const int g = (threadIdx.x & 31) >> 2;
  const int q = threadIdx.x & 3;
#if defined(__CUDA_ARCH__)
  const float av[4] = {a[g * lda + q], a[(g + 8) * lda + q], a[g * lda + q + 4], a[(g + 8) * lda + q + 4]};
  unsigned int ahi[4];
  unsigned int alo[4];
  for (int i = 0; i < 4; ++i) {
    ahi[i] = gpu_tf32(av[i]);
    alo[i] = gpu_tf32(av[i] - __uint_as_float(ahi[i]));
  }
  for (int h = 0; h < 2; ++h) {
    const float b0 = b[(8 * h + g) * ldb + q];  // B^T's element (k = q, n = g) of this half
    const float b1 = b[(8 * h + g) * ldb + q + 4];
    const unsigned int b0hi = gpu_tf32(b0);
    const unsigned int b1hi = gpu_tf32(b1);
    const unsigned int b0lo = gpu_tf32(b0 - __uint_as_float(b0hi));
    const unsigned int b1lo = gpu_tf32(b1 - __uint_as_float(b1hi));
    gpu_mma_tf32(t.c + 4 * h, alo, b0hi, b1hi);
    gpu_mma_tf32(t.c + 4 * h, ahi, b0lo, b1lo);
    gpu_mma_tf32(t.c + 4 * h, ahi, b0hi, b1hi);
  }
#else
  for (int e = 0; e < 8; ++e) {
    const int row = g + 8 * ((e & 3) >> 1);
    const int col = 8 * (e >> 2) + 2 * q + (e & 1);
    float s = 0.0f;
    for (int k = 0; k < 8; ++k) {
      s += a[row * lda + k] * b[col * ldb + k];
    }
    t.c[e] += s;
  }
#endif
}
GPU_FN void gpu_tile16_store(const gpu_tile16& t, float* c, int ldc) {
  const int g = (threadIdx.x & 31) >> 2;
  const int q = threadIdx.x & 3;
  for (int e = 0; e < 8; ++e) {
    c[(g + 8 * ((e & 3) >> 1)) * ldc + 8 * (e >> 2) + 2 * q + (e & 1)] = t.c[e];
  }
}
// Orders the warp's shared-memory accesses (a tile stored by some lanes, read by others).
GPU_FN void gpu_simd_barrier() { __syncwarp(); }
