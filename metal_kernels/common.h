// Backend-neutral helpers for the KDA kernels. The backend header defines KDA_FN, kda_exp,
// kda_log, kda_rsqrt, kda_fmax, kda_fabs, kda_as_float (a word's bits as a float) and kda_simd_sum (a sum
// over the 32 lanes of a group).

// The value (word >> shift) & mask (< 2^23) as a float, exactly, without an integer-to-float conversion (a
// quarter-rate instruction on NVIDIA GPUs; on an H200 the MoE and KDA decode kernels ran no faster without it,
// so it is not what bounds them): the bits go under the exponent of 2^23, whose float then holds 2^23 + value,
// and 2^23 is subtracted.
KDA_FN float kda_qval(unsigned int word, int shift, unsigned int mask) {
  return kda_as_float(0x4B000000u | ((word >> shift) & mask)) - 8388608.0f;
}

KDA_FN float kda_silu(float x) {
  return x / (1.0f + kda_exp(-x));
}

KDA_FN float kda_sigmoid(float x) {
  return 1.0f / (1.0f + kda_exp(-x));
}

// log(1 + x) without losing small x (Metal has no log1p).
KDA_FN float kda_log1p(float x) {
  float u = 1.0f + x;
  return u == 1.0f ? x : kda_log(u) * (x / (u - 1.0f));
}

// PyTorch softplus: linear above 20.
KDA_FN float kda_softplus(float x) {
  return x > 20.0f ? x : kda_fmax(x, 0.0f) + kda_log1p(kda_exp(-kda_fabs(x)));
}
