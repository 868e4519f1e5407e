// attention_pool launchers of r2m_cuda.h (docs/design.md §2); the semantics of
// r2m_kernels/triton/attention_pool.py:
//     pooled[b, j] = sum_t softmax_t(q_scaled[b, j] . h[b, t]) h[b, t]      over valid t
//
// Work layout. A block owns one sequence and one contiguous chunk of its positions (the
// flash-decoding split), and one head (forward; backward without dhidden) or every head
// (backward with dhidden, so that it alone writes its rows of dhidden). Its threads span D:
// thread t owns the units u * blockDim + t (u < UNITS) of VEC elements each, VEC = 16 bytes
// of hidden where the rows allow it (coalesced 16-byte loads), else 1 (scalar fallback).
// Each iteration loads ROWS rows into registers before using any of them, reduces all their
// dot products in one block reduction, and reuses the same registers for the accumulation,
// so hidden is read once per block. q (and grad) are read again each iteration, from L1,
// rather than held in registers: at D = 16384 those cannot hold them beside the rows and the
// accumulator. All math is fp32.
#include "r2m_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

// Every loop over a register array is unrolled, so the arrays are indexed by constants only.
#define UNROLL _Pragma("unroll")

namespace r2m {
namespace {

constexpr int kMaxDim = 16384;
constexpr int kMaxHeads = 64;
// 512 threads at most, and __launch_bounds__(kMaxThreads, 1) caps every kernel at 128
// registers a thread; the tile sizes below are chosen to fit that with no spills.
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
// Chunks are a whole number of granules, a multiple of every ROWS used, so only a chunk's
// last row group can be partial. Both directions use chunk_of(), hence the same chunks.
constexpr int kChunkGranule = 16;

// ---- hidden's storage <-> fp32 --------------------------------------------------------------

// One thread's VEC elements of a row of hidden, kept as raw 32-bit words: a 16-bit row takes
// half the registers it would as floats. Scalar 16-bit elements sit in the low half of a word.
template <typename T, int VEC>
struct Packet {
  static constexpr int kWords = VEC == 1 ? 1 : VEC * int(sizeof(T)) / 4;
  uint32_t word[kWords];

  __device__ static Packet zero() {
    Packet x;
    UNROLL for (int i = 0; i < kWords; ++i) x.word[i] = 0u;
    return x;
  }

  // ld.global.cg caches in L2 only: hidden is streamed, and keeping it out of L1 leaves L1
  // to the q / grad vectors that every iteration reads again.
  __device__ static Packet load(const T* src) {
    Packet x;
    if constexpr (VEC == 1 && sizeof(T) == 4) {
      x.word[0] = __ldcg(reinterpret_cast<const unsigned int*>(src));
    } else if constexpr (VEC == 1) {
      x.word[0] = __ldcg(reinterpret_cast<const unsigned short*>(src));
    } else {
      static_assert(kWords == 4, "a vector unit is 16 bytes");
      const uint4 v = __ldcg(reinterpret_cast<const uint4*>(src));
      x.word[0] = v.x, x.word[1] = v.y, x.word[2] = v.z, x.word[3] = v.w;
    }
    return x;
  }

  __device__ float get(int e) const {  // e is a compile-time constant at every call
    if constexpr (std::is_same_v<T, float>) {
      return __uint_as_float(word[e]);
    } else {
      const uint32_t bits = (e & 1) ? word[e / 2] >> 16 : word[e / 2] & 0xffffu;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) return __uint_as_float(bits << 16);
      else return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }
};

template <typename T>
__device__ uint32_t storage_bits(float x) {  // round to nearest even, as torch's .to() does
  if constexpr (std::is_same_v<T, float>) return __float_as_uint(x);
  else if constexpr (std::is_same_v<T, __half>) return __half_as_ushort(__float2half_rn(x));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T, int VEC>
__device__ void store_unit(T* dst, const float (&x)[VEC]) {
  if constexpr (VEC == 1 && sizeof(T) == 4) {
    *reinterpret_cast<unsigned int*>(dst) = storage_bits<T>(x[0]);
  } else if constexpr (VEC == 1) {
    *reinterpret_cast<unsigned short*>(dst) = static_cast<unsigned short>(storage_bits<T>(x[0]));
  } else {
    Packet<T, VEC> out = Packet<T, VEC>::zero();
    UNROLL for (int e = 0; e < VEC; ++e) {
      if constexpr (sizeof(T) == 4) out.word[e] = storage_bits<T>(x[e]);
      else out.word[e / 2] |= storage_bits<T>(x[e]) << (16 * (e & 1));
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(out.word[0], out.word[1], out.word[2], out.word[3]);
  }
}

// fp32 vectors (q, grad, out, dq) at one thread's unit: float4 accesses on the vector path.
template <int VEC>
__device__ void load_floats(const float* src, float (&x)[VEC]) {
  if constexpr (VEC % 4 == 0) {
    UNROLL for (int i = 0; i < VEC / 4; ++i) {
      const float4 v = reinterpret_cast<const float4*>(src)[i];
      x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
    }
  } else {
    UNROLL for (int i = 0; i < VEC; ++i) x[i] = src[i];
  }
}

template <int VEC>
__device__ void store_floats(float* dst, const float (&x)[VEC]) {
  if constexpr (VEC % 4 == 0) {
    UNROLL for (int i = 0; i < VEC / 4; ++i)
      reinterpret_cast<float4*>(dst)[i] =
          make_float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
  } else {
    UNROLL for (int i = 0; i < VEC; ++i) dst[i] = x[i];
  }
}

// ---- sequences, chunks, columns ----------------------------------------------------------

template <typename T>
struct Sequence {
  const T* rows;       // row 0 of the sequence in hidden
  int length;          // S (padded) or its packed length (positions are int: < 2^31 rows)
  int64_t dense_row0;  // index of row 0 in the contiguous (B*S or N, D) row layout of dhidden
};

template <typename T>
__device__ Sequence<T> locate_sequence(const PoolProblem& p, int b) {
  const T* hidden = static_cast<const T*>(p.hidden);
  if (p.cu_seqlens != nullptr) {
    const int64_t first = p.cu_seqlens[b];
    return {hidden + first * p.stride_hs, int(p.cu_seqlens[b + 1] - first), first};
  }
  return {hidden + b * p.stride_hb, int(p.seq_len), b * p.seq_len};
}

struct Chunk {
  int start, stop;  // start <= stop always; empty when equal
};

// Equal chunks of whole granules; the last ones may be short or empty.
__device__ Chunk chunk_of(int length, int split, int n_split) {
  const int per_split = length / n_split + (length % n_split != 0);
  const int size = (per_split + kChunkGranule - 1) / kChunkGranule * kChunkGranule;
  const int start = int(min(int64_t(split) * size, int64_t(length)));  // the product may pass 2^31
  return {start, start + min(size, length - start)};
}

__device__ bool position_valid(const PoolProblem& p, int b, int t, int stop) {
  return t < stop && (p.mask == nullptr || p.mask[b * p.stride_mb + t * p.stride_ms] != 0);
}

// The columns of this thread: its units u < owned start at column first + u * step.
template <int VEC, int UNITS>
struct Columns {
  int first, step, owned;

  __device__ static Columns of_thread(int dim) {  // threads * UNITS * VEC >= D, D % VEC == 0
    const int first = int(threadIdx.x) * VEC, step = int(blockDim.x) * VEC;
    const int owned = first < dim ? (dim - first - 1) / step + 1 : 0;
    return {first, step, owned < UNITS ? owned : UNITS};
  }
  __device__ int at(int u) const { return first + u * step; }
  __device__ bool owns(int u) const { return u < owned; }
  // A copy the compiler cannot see through. Taken afresh in each phase of an iteration, it
  // makes the compiler recompute each unit's column and ownership (one multiply-add, one
  // compare) where they are used, instead of hoisting UNITS addresses and predicates out of
  // the loop or keeping them alive across the barrier, in registers the rows need.
  __device__ Columns opaque() const {
    Columns c = *this;
    asm volatile("" : "+r"(c.step), "+r"(c.owned));
    return c;
  }
};

// Loads the rows [t0, t0 + ROWS) whose validity `upcoming` holds (zeros at invalid positions
// and unowned units) into `rows`, moves that validity to `valid`, and fetches the next
// group's into `upcoming`: the mask of a group is read one iteration ahead, so it never
// delays a row load.
template <typename T, int VEC, int UNITS, int ROWS>
__device__ void load_row_group(const PoolProblem& p, int b, const Sequence<T>& seq,
                               const Chunk& chunk, int t0, const Columns<VEC, UNITS>& cols,
                               bool (&upcoming)[ROWS],
                               bool (&valid)[ROWS], Packet<T, VEC> (&rows)[ROWS][UNITS]) {
  UNROLL for (int r = 0; r < ROWS; ++r) {
    valid[r] = upcoming[r];
    const T* row = seq.rows + (t0 + r) * p.stride_hs;
    UNROLL for (int u = 0; u < UNITS; ++u)
      rows[r][u] = valid[r] && cols.owns(u) ? Packet<T, VEC>::load(row + cols.at(u))
                                            : Packet<T, VEC>::zero();
  }
  UNROLL for (int r = 0; r < ROWS; ++r)
    upcoming[r] = position_valid(p, b, t0 + ROWS + r, chunk.stop);
}

// Sums x over the block; every thread gets the same sums (same order of additions). One
// barrier: the scratch is double-buffered, and a thread can only write a buffer again after
// the next call's barrier, which every thread reaches after reading it.
template <int N>
__device__ void block_sum(float (&x)[N], float (&scratch)[2][kMaxWarps][N], int& parity) {
  UNROLL for (int i = 0; i < N; ++i) {
    UNROLL for (int lanes = 16; lanes > 0; lanes /= 2) x[i] += __shfl_xor_sync(~0u, x[i], lanes);
  }
  if (threadIdx.x % 32 == 0) {
    UNROLL for (int i = 0; i < N; ++i) scratch[parity][threadIdx.x / 32][i] = x[i];
  }
  __syncthreads();
  UNROLL for (int i = 0; i < N; ++i) x[i] = 0.f;
  // Unrolled by 2 only: deeper costs registers that the largest tiles need (spills).
  _Pragma("unroll 2") for (int w = 0; w < int(blockDim.x / 32); ++w) {
    UNROLL for (int i = 0; i < N; ++i) x[i] += scratch[parity][w][i];
  }
  parity ^= 1;
}

// ---- kernels ------------------------------------------------------------------------------------

// grid (B * n_h, n_split). out / lse slot (split, b, j) = blockIdx.y * gridDim.x + blockIdx.x.
template <typename T, int VEC, int UNITS, int ROWS>
__global__ void __launch_bounds__(kMaxThreads, 1)
pool_forward_kernel(const PoolProblem p, float* out, float* lse) {
  __shared__ __align__(16) float scratch[2][kMaxWarps][ROWS];
  const int b = int(blockIdx.x) / int(p.heads);
  const Sequence<T> seq = locate_sequence<T>(p, b);
  const Chunk chunk = chunk_of(seq.length, int(blockIdx.y), int(gridDim.y));
  const Columns<VEC, UNITS> columns = Columns<VEC, UNITS>::of_thread(int(p.dim));
  const float* q = p.q_scaled + int64_t(blockIdx.x) * p.dim;  // row (b, j) of (B, n_h, D)

  // Online softmax: running max and sum of exp(score - max) over the valid positions seen.
  // No infinity enters the arithmetic: `seen` says whether run_max means anything yet.
  bool seen = false;
  float run_max = 0.f, run_sum = 0.f;
  float acc[UNITS][VEC] = {};
  int parity = 0;
  bool upcoming[ROWS];
  UNROLL for (int r = 0; r < ROWS; ++r)
    upcoming[r] = position_valid(p, b, chunk.start + r, chunk.stop);

  for (int t0 = chunk.start; t0 < chunk.stop; t0 += ROWS) {
    bool valid[ROWS];
    Packet<T, VEC> rows[ROWS][UNITS];
    load_row_group<T, VEC, UNITS, ROWS>(p, b, seq, chunk, t0, columns.opaque(), upcoming, valid,
                                        rows);

    float score[ROWS] = {};
    const Columns<VEC, UNITS> cols = columns.opaque();
    UNROLL for (int u = 0; u < UNITS; ++u) {
      float qv[VEC] = {};
      if (cols.owns(u)) load_floats<VEC>(q + cols.at(u), qv);
      UNROLL for (int r = 0; r < ROWS; ++r) {
        UNROLL for (int e = 0; e < VEC; ++e) score[r] += rows[r][u].get(e) * qv[e];
      }
    }
    block_sum<ROWS>(score, scratch, parity);

    bool any = false;
    float group_max = 0.f;
    UNROLL for (int r = 0; r < ROWS; ++r) {
      if (valid[r]) {
        group_max = any ? fmaxf(group_max, score[r]) : score[r];
        any = true;
      }
    }
    if (!any) continue;  // decided alike on every thread (same validity, after the barrier)
    const float new_max = seen ? fmaxf(run_max, group_max) : group_max;
    const float rescale = seen ? __expf(run_max - new_max) : 0.f;
    float weight[ROWS];
    UNROLL for (int r = 0; r < ROWS; ++r) weight[r] = valid[r] ? __expf(score[r] - new_max) : 0.f;
    run_sum *= rescale;
    UNROLL for (int r = 0; r < ROWS; ++r) run_sum += weight[r];
    UNROLL for (int u = 0; u < UNITS; ++u) {
      UNROLL for (int e = 0; e < VEC; ++e) {
        float a = acc[u][e] * rescale;
        UNROLL for (int r = 0; r < ROWS; ++r) a += weight[r] * rows[r][u].get(e);
        acc[u][e] = a;
      }
    }
    run_max = new_max;
    seen = true;
  }

  const int64_t slot = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const float inv_sum = seen ? 1.f / run_sum : 0.f;  // an empty chunk writes zeros
  UNROLL for (int u = 0; u < UNITS; ++u) {
    if (columns.owns(u)) {
      float o[VEC];
      UNROLL for (int e = 0; e < VEC; ++e) o[e] = acc[u][e] * inv_sum;
      store_floats<VEC>(out + slot * p.dim + columns.at(u), o);
    }
  }
  if (threadIdx.x == 0) lse[slot] = seen ? run_max + __logf(run_sum) : -INFINITY;
}

// NEED_DH: grid (B, n_split), the block loops over every head of its rows and writes each
// row of dhidden once, the heads summed in fp32 registers. Otherwise grid (B * n_h, n_split),
// one head a block. dq partial slot (split, b, j) as in the forward.
//
// dq of one head accumulates in registers across the chunk. With several heads a block
// cannot hold n_h of them, so it adds each row group's share into its own columns of its dq
// slots in global memory (zeroed first; only this thread touches them, so no sync).
template <typename T, int VEC, int UNITS, int ROWS, bool NEED_DH>
__global__ void __launch_bounds__(kMaxThreads, 1)
pool_backward_kernel(const PoolProblem p, const float* grad, const float* lse, const float* delta,
                     float* dq, T* dhidden) {
  __shared__ __align__(16) float scratch[2][kMaxWarps][2 * ROWS];
  const int b = NEED_DH ? int(blockIdx.x) : int(blockIdx.x) / int(p.heads);
  const int first_slot = NEED_DH ? b * int(p.heads) : int(blockIdx.x);  // row (b, j) of (B, n_h)
  const int n_heads = NEED_DH ? int(p.heads) : 1;
  const Sequence<T> seq = locate_sequence<T>(p, b);
  const Chunk chunk = chunk_of(seq.length, int(blockIdx.y), int(gridDim.y));
  const Columns<VEC, UNITS> columns = Columns<VEC, UNITS>::of_thread(int(p.dim));
  float* dq_block = dq + (int64_t(blockIdx.y) * p.batch * p.heads + first_slot) * p.dim;

  // dq of one head accumulates in registers across the chunk, up to 16 columns a thread;
  // beyond (D > 8192) or with several heads it goes through global memory as said above.
  const bool dq_in_registers = UNITS * VEC <= 16 && n_heads == 1;
  float dq_acc[UNITS][VEC] = {};  // dead, so no registers, when !dq_in_registers
  if (!dq_in_registers) {
    const float zeros[VEC] = {};
    for (int jj = 0; jj < n_heads; ++jj) {
      UNROLL for (int u = 0; u < UNITS; ++u)
        if (columns.owns(u)) store_floats<VEC>(dq_block + jj * p.dim + columns.at(u), zeros);
    }
  }
  int parity = 0;
  bool upcoming[ROWS];
  UNROLL for (int r = 0; r < ROWS; ++r)
    upcoming[r] = position_valid(p, b, chunk.start + r, chunk.stop);

  for (int t0 = chunk.start; t0 < chunk.stop; t0 += ROWS) {
    bool valid[ROWS];
    Packet<T, VEC> rows[ROWS][UNITS];
    load_row_group<T, VEC, UNITS, ROWS>(p, b, seq, chunk, t0, columns.opaque(), upcoming, valid,
                                        rows);
    float dh[NEED_DH ? ROWS : 1][UNITS][VEC] = {};

    for (int jj = 0; jj < n_heads; ++jj) {
      const float* q = p.q_scaled + (first_slot + jj) * p.dim;  // int64: p.dim is int64_t
      const float* g = grad + (first_slot + jj) * p.dim;
      float dots[2 * ROWS] = {};  // q . h_r, then grad . h_r
      const Columns<VEC, UNITS> before = columns.opaque();
      UNROLL for (int u = 0; u < UNITS; ++u) {
        float qv[VEC] = {}, gv[VEC] = {};
        if (before.owns(u)) {
          load_floats<VEC>(q + before.at(u), qv);
          load_floats<VEC>(g + before.at(u), gv);
        }
        UNROLL for (int r = 0; r < ROWS; ++r) {
          UNROLL for (int e = 0; e < VEC; ++e) {
            const float h = rows[r][u].get(e);
            dots[r] += h * qv[e];
            dots[ROWS + r] += h * gv[e];
          }
        }
      }
      block_sum<2 * ROWS>(dots, scratch, parity);

      const float lse_j = lse[first_slot + jj], delta_j = delta[first_slot + jj];
      float attn[ROWS], dscore[ROWS], dscore_dq[ROWS];
      UNROLL for (int r = 0; r < ROWS; ++r) {
        attn[r] = valid[r] ? __expf(dots[r] - lse_j) : 0.f;
        dscore[r] = attn[r] * (dots[ROWS + r] - delta_j);
        dscore_dq[r] = dscore[r] * p.softmax_scale;  // dq's terms, scaled before the products
      }
      // Fresh addresses after the barrier, not the ones above kept alive across it. q and
      // grad are read again (from L1) for dh for the same reason: at large D the registers
      // cannot hold them beside the rows, dq and dh.
      const Columns<VEC, UNITS> after = columns.opaque();
      UNROLL for (int u = 0; u < UNITS; ++u) {
        float share[VEC];
        UNROLL for (int e = 0; e < VEC; ++e) {
          share[e] = 0.f;
          UNROLL for (int r = 0; r < ROWS; ++r) share[e] += dscore_dq[r] * rows[r][u].get(e);
        }
        if (dq_in_registers) {
          UNROLL for (int e = 0; e < VEC; ++e) dq_acc[u][e] += share[e];
        } else if (after.owns(u)) {
          float* dst = dq_block + jj * p.dim + after.at(u);
          float sum[VEC];
          load_floats<VEC>(dst, sum);
          UNROLL for (int e = 0; e < VEC; ++e) sum[e] += share[e];
          store_floats<VEC>(dst, sum);
        }
        if constexpr (NEED_DH) {
          float qv[VEC] = {}, gv[VEC] = {};
          if (after.owns(u)) {
            load_floats<VEC>(q + after.at(u), qv);
            load_floats<VEC>(g + after.at(u), gv);
          }
          UNROLL for (int r = 0; r < ROWS; ++r) {
            UNROLL for (int e = 0; e < VEC; ++e) dh[r][u][e] += dscore[r] * qv[e] + attn[r] * gv[e];
          }
        }
      }
    }

    if constexpr (NEED_DH) {
      // Every position of the chunk is written, invalid ones with their zeros.
      const Columns<VEC, UNITS> cols = columns.opaque();
      UNROLL for (int r = 0; r < ROWS; ++r) {
        if (t0 + r < chunk.stop) {
          T* row = dhidden + (seq.dense_row0 + t0 + r) * p.dim;
          UNROLL for (int u = 0; u < UNITS; ++u)
            if (cols.owns(u)) store_unit<T, VEC>(row + cols.at(u), dh[r][u]);
        }
      }
    }
  }

  if (dq_in_registers) {
    UNROLL for (int u = 0; u < UNITS; ++u)
      if (columns.owns(u)) store_floats<VEC>(dq_block + columns.at(u), dq_acc[u]);
  }
}

// ---- host side -------------------------------------------------------------------------------

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte units need every row of hidden and every fp32 vector to start on 16 bytes.
template <typename T>
bool can_vectorize(const PoolProblem& p, std::initializer_list<const void*> fp32_buffers) {
  constexpr int64_t vec = 16 / sizeof(T), size = sizeof(T);
  bool ok = p.dim % vec == 0 && aligned16(p.hidden) && aligned16(p.q_scaled) &&
            p.stride_hs * size % 16 == 0 &&
            (p.cu_seqlens != nullptr || p.stride_hb * size % 16 == 0);
  for (const void* buffer : fp32_buffers) ok = ok && (buffer == nullptr || aligned16(buffer));
  return ok;
}

// Columns a thread owns: 8 up to D = 2048 (<= 256 threads), 16 up to 8192 (<= 512), 32 up
// to 16384 (<= 512). More columns a thread means fewer rows in flight in the same registers,
// so the smallest size that keeps the block within 512 threads (or 256 for small D, where
// several blocks share an SM) is chosen. Three sizes keep the instantiations few (54).
int columns_per_thread(int64_t dim) { return dim <= 2048 ? 8 : dim <= 8192 ? 16 : 32; }

int block_threads(int64_t dim, int columns) {
  const int64_t threads = (dim + columns - 1) / columns;
  return int((threads + 31) / 32 * 32);
}

// Rows loaded per iteration: about 32 registers of raw rows a thread (128 bytes in flight),
// 48 counting the fp32 dh accumulators of the dhidden kernel; a power of two <= 8.
template <typename T, int VEC, int UNITS, bool NEED_DH>
constexpr int rows_per_group() {
  const int per_row = UNITS * Packet<T, VEC>::kWords + (NEED_DH ? UNITS * VEC : 0);
  const int fit = (NEED_DH ? 48 : 32) / per_row;
  return fit >= 8 ? 8 : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls launch(Int<VEC>, Int<UNITS>) for the instantiation that fits D and the alignment.
template <typename T, typename Launch>
cudaError_t with_tile(bool vectorized, int columns, Launch&& launch) {
  constexpr int kVec = 16 / int(sizeof(T));
  if (vectorized) {
    if (columns == 8) return launch(Int<kVec>{}, Int<8 / kVec>{});
    if (columns == 16) return launch(Int<kVec>{}, Int<16 / kVec>{});
    return launch(Int<kVec>{}, Int<32 / kVec>{});
  }
  if (columns == 8) return launch(Int<1>{}, Int<8>{});
  if (columns == 16) return launch(Int<1>{}, Int<16>{});
  return launch(Int<1>{}, Int<32>{});
}

bool in_contract(const PoolProblem& p) {
  return p.dim >= 1 && p.dim <= kMaxDim && p.heads >= 1 && p.heads <= kMaxHeads && p.n_split >= 1 &&
         p.n_split <= 65535 && p.batch >= 0 && p.batch * p.heads <= INT32_MAX && p.seq_len >= 0 &&
         p.seq_len <= INT32_MAX - 64 &&
         p.hidden != nullptr && p.q_scaled != nullptr;
}

template <typename T>
cudaError_t forward(const PoolProblem& p, float* out, float* lse, cudaStream_t stream) {
  const int columns = columns_per_thread(p.dim);
  const dim3 grid(unsigned(p.batch * p.heads), unsigned(p.n_split));
  const int threads = block_threads(p.dim, columns);
  return with_tile<T>(can_vectorize<T>(p, {out}), columns, [&](auto vec, auto units) {
    constexpr int kVec = decltype(vec)::value, kUnits = decltype(units)::value;
    constexpr int kRows = rows_per_group<T, kVec, kUnits, false>();
    pool_forward_kernel<T, kVec, kUnits, kRows><<<grid, threads, 0, stream>>>(p, out, lse);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward(const PoolProblem& p, const float* grad, const float* lse, const float* delta,
                     float* dq, void* dhidden, cudaStream_t stream) {
  const int columns = columns_per_thread(p.dim);
  const bool need_dh = dhidden != nullptr;
  const dim3 grid(unsigned(need_dh ? p.batch : p.batch * p.heads), unsigned(p.n_split));
  const int threads = block_threads(p.dim, columns);
  T* dh = static_cast<T*>(dhidden);
  return with_tile<T>(can_vectorize<T>(p, {grad, dq, dhidden}), columns, [&](auto vec, auto units) {
    constexpr int kVec = decltype(vec)::value, kUnits = decltype(units)::value;
    if (need_dh)
      pool_backward_kernel<T, kVec, kUnits, rows_per_group<T, kVec, kUnits, true>(), true>
          <<<grid, threads, 0, stream>>>(p, grad, lse, delta, dq, dh);
    else
      pool_backward_kernel<T, kVec, kUnits, rows_per_group<T, kVec, kUnits, false>(), false>
          <<<grid, threads, 0, stream>>>(p, grad, lse, delta, dq, dh);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t attention_pool_forward(const PoolProblem& p, float* out, float* lse,
                                   cudaStream_t stream) {
  if (!in_contract(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;  // nothing to write
  switch (p.dtype) {
    case Dtype::kFloat32: return forward<float>(p, out, lse, stream);
    case Dtype::kFloat16: return forward<__half>(p, out, lse, stream);
    case Dtype::kBFloat16: return forward<__nv_bfloat16>(p, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_pool_backward(const PoolProblem& p, const float* grad, const float* lse,
                                    const float* delta, float* dq, void* dhidden,
                                    cudaStream_t stream) {
  if (!in_contract(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  switch (p.dtype) {
    case Dtype::kFloat32: return backward<float>(p, grad, lse, delta, dq, dhidden, stream);
    case Dtype::kFloat16: return backward<__half>(p, grad, lse, delta, dq, dhidden, stream);
    case Dtype::kBFloat16: return backward<__nv_bfloat16>(p, grad, lse, delta, dq, dhidden, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace r2m
