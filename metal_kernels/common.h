// Backend-neutral helpers shared by every kernel (KDA, MLA, MoE). The backend header defines GPU_FN, gpu_exp,
// gpu_log, gpu_rsqrt, gpu_fmax, gpu_fabs, gpu_as_float (a word's bits as a float) and gpu_simd_sum (a sum
// over the 32 lanes of a group).

// The value (word >> shift) & mask (< 2^23) as a float, exactly, without an integer-to-float conversion (a
// quarter-rate instruction on NVIDIA GPUs): the bits go under the exponent of 2^23, whose float then holds
// 2^23 + value, and 2^23 is subtracted.
GPU_FN float gpu_qval(unsigned int word, int shift, unsigned int mask) {
  return gpu_as_float(0x4B000000u | ((word >> shift) & mask)) - 8388608.0f;
}

// A packed value times 2^s, left where it sits in a 16-bit half of its word (s: its bit offset in that half; the
// high half's values read from word >> 16): its bits masked in place under 2^23's exponent, minus 2^23. Exact, and
// no shift a value (one mask and one subtraction): the caller scales the value's partner by 2^-s instead, which
// is exact (a power of two), so each product is the one gpu_qval's value would give.
GPU_FN float gpu_qval_placed(unsigned int part, int s, unsigned int mask) {
  return gpu_as_float(0x4B000000u | (part & (mask << s))) - 8388608.0f;
}

// Value j of a word packed BITS to a value (value j in bits j * BITS), dequantized in place (gpu_qval_placed): it
// times 2^((j * BITS) % 16), to be multiplied by gpu_placed_partner<BITS>(x, j), so the product is value j times x.
template <int BITS>
GPU_FN float gpu_qval_at(unsigned int word, int j) {
  return gpu_qval_placed(j * BITS < 16 ? word : word >> 16, (j * BITS) % 16, (1u << BITS) - 1u);
}

// x scaled by 2^-((j * BITS) % 16), exactly: the partner of gpu_qval_at<BITS>(word, j).
template <int BITS>
GPU_FN float gpu_placed_partner(float x, int j) {
  return x * (1.0f / static_cast<float>(1u << ((j * BITS) % 16)));
}

GPU_FN float gpu_silu(float x) {
  return x / (1.0f + gpu_exp(-x));
}

GPU_FN float gpu_sigmoid(float x) {
  return 1.0f / (1.0f + gpu_exp(-x));
}

// log(1 + x) without losing small x (Metal has no log1p).
GPU_FN float gpu_log1p(float x) {
  float u = 1.0f + x;
  return u == 1.0f ? x : gpu_log(u) * (x / (u - 1.0f));
}

// PyTorch softplus: linear above 20.
GPU_FN float gpu_softplus(float x) {
  return x > 20.0f ? x : gpu_fmax(x, 0.0f) + gpu_log1p(gpu_exp(-gpu_fabs(x)));
}
