// Matrix-unit tiles for the kernels whose spec asks for them (KernelSpec.tiles): included after metal.h.
// A 16x16 float32 tile held by one 32-lane group, on the matrix units (simdgroup_matrix: four 8x8 blocks). Its
// operands and its result live in threadgroup memory, so the kernel text never sees a lane's share of it:
//   gpu_tile16_zero(t);  gpu_tile16_mma_abt(t, a, lda, b, ldb): t += A B^T, A and B 16 rows x 8 columns (row
//   strides lda, ldb floats);  gpu_tile16_store(t, c, ldc): writes t to c (row stride ldc). Every lane of the group calls them.
#ifndef GPU_SHARED_ARG
#define GPU_SHARED_ARG threadgroup
#endif
struct gpu_tile16 {
  simdgroup_float8x8 m[2][2];
};
GPU_FN void gpu_tile16_zero(thread gpu_tile16& t) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      t.m[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
}
GPU_FN void gpu_tile16_mma_abt(thread gpu_tile16& t, const GPU_SHARED_ARG float* a, int lda,
                               const GPU_SHARED_ARG float* b, int ldb) {
  simdgroup_float8x8 am[2];
  simdgroup_float8x8 bm[2];
  for (int i = 0; i < 2; ++i) {
    simdgroup_load(am[i], a + 8 * i * lda, ulong(lda));
    simdgroup_load(bm[i], b + 8 * i * ldb, ulong(ldb), ulong2(0), true);  // B^T: element (k, n) = b[n][k]
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_multiply_accumulate(t.m[i][j], am[i], bm[j], t.m[i][j]);
    }
  }
}
GPU_FN void gpu_tile16_store(thread const gpu_tile16& t, GPU_SHARED_ARG float* c, int ldc) {
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      simdgroup_store(t.m[i][j], c + 8 * i * ldc + 8 * j, ulong(ldc));
    }
  }
}
// Orders the 32-lane group's threadgroup-memory accesses (a tile stored by some lanes, read by others).
GPU_FN void gpu_simd_barrier() { metal::simdgroup_barrier(metal::mem_flags::mem_threadgroup); }
