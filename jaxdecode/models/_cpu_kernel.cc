// Few-row matrix products for XLA:CPU, called through jax.ffi (see _cpu_kernel.py).
//
// Decoding multiplies 1-8 activation rows by each weight matrix: the time is the weight
// stream from memory. These kernels read every weight byte once per call, from every core,
// with AVX-512 (f32 FMA; bf16 widened to f32, or bf16 pair dots for output-major matrices;
// int8 via VNNI). Each output element is summed
// in an order that depends only on K, never on how many rows are in the call, so a row's
// result does not change with the batch it is in.
//
//   jd_matmul_f32: x f32[..., M, K] times w (f32 or bf16) -> f32[..., M, N]
//                  w is [K, N] (input-major), or [N, K] with transposed=true
//   jd_matmul_s8:  x s8[..., M, K] times w s8[N, K]^T -> s32[..., M, N] (exact)
//
// Built at first use with -march=native; any build or load failure leaves XLA's dot in use.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <sched.h>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "jaxdecode's CPU kernel needs AVX-512F/BW/VNNI (the XLA path is used instead)"
#endif

namespace {

// ---- threads. Decoding calls these kernels ~150 times per token with a few microseconds of
// XLA work between calls; waking a sleeping thread costs about as long as a small call. So the
// kernel keeps its own workers (one per extra core), which spin for a short while
// (JAXDECODE_CPU_KERNEL_SPIN_US, default 300) after each call before sleeping. A call made
// while another is running (XLA may run two at once) just runs on its caller's thread.
//
// Chunks are claimed from a shared counter and the caller works too, waiting only for chunks
// already claimed. Each call's state lives on the heap: a late worker may look at the counter
// after the caller returned, but never runs a chunk then.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  void (*fn)(const void*, int64_t) = nullptr;
  const void* ctx = nullptr;
  void work() {
    int64_t i;
    while ((i = next.fetch_add(1)) < n) {
      fn(ctx, i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Workers {
 public:
  static Workers& get() {
    static Workers* w = new Workers();  // never destroyed: workers may outlive static teardown
    return *w;
  }

  int64_t size() const { return threads_ + 1; }

  template <class F>
  void run(int64_t n, const F& f) {
    std::unique_lock<std::mutex> busy(call_mu_, std::try_to_lock);
    if (threads_ == 0 || n <= 1 || !busy.owns_lock()) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->n = n;
    job->fn = [](const void* ctx, int64_t i) { (*static_cast<const F*>(ctx))(i); };
    job->ctx = &f;
    std::atomic_store(&job_, job);
    gen_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    job->work();
    while (job->done.load(std::memory_order_acquire) < n) _mm_pause();
  }

 private:
  Workers() {
    const char* env = std::getenv("JAXDECODE_CPU_KERNEL_SPIN_US");
    spin_us_ = env ? std::atoi(env) : 300;
    cpu_set_t set;
    int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    const char* cap = std::getenv("JAXDECODE_CPU_KERNEL_THREADS");
    if (cap) cpus = std::max(1, std::min(cpus, std::atoi(cap)));
    threads_ = cpus - 1;
    for (int t = 0; t < threads_; ++t) std::thread([this] { loop(); }).detach();
  }

  void loop() {
    uint64_t seen = gen_.load();
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int spins = 0; gen_.load() == seen; ++spins) {
        _mm_pause();
        if ((spins & 63) == 63 &&
            std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
          std::unique_lock<std::mutex> lk(mu_);
          sleeping_.fetch_add(1);
          cv_.wait(lk, [&] { return gen_.load() != seen; });
          sleeping_.fetch_sub(1);
        }
      }
      seen = gen_.load();
      if (auto job = std::atomic_load(&job_)) job->work();
    }
  }

  int threads_ = 0;
  int spin_us_ = 300;
  std::mutex call_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<Job> job_;
};

template <class F>
void parallel_chunks(int64_t n, F f) {
  Workers::get().run(n, f);
}

// ---- loads widened to 16 floats (a masked tail reads zeros)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Hardware prefetchers lose the thread when a tile's short rows end; asking for the next
// tile's (or the next rows') lines while this one is summed keeps the stream full.
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline __mmask16 tail16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// Sixteen horizontal sums at once: out[l] = sum of the 16 lanes of a[l] (l < n; missing
// vectors count as zero), by a fixed tree of shuffles and adds. Every vector's lanes are
// added in the same order wherever it sits, so results do not depend on the tile shape.
inline void hsum16(const __m512* a, int n, float* out) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) {
    const int l = 4 * (i % 4) + i / 4;  // the tree below lands v[4q + c] in lane 4c + q
    v[i] = l < n ? a[l] : _mm512_setzero_ps();
  }
  __m512 s[8], u[4], x[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]),
                         _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]));
  const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(x[0]), _mm512_castps_pd(x[1]));
  const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(x[0]), _mm512_castps_pd(x[1]));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi)));
}

inline void hsum16(const __m512i* a, int n, int32_t* out) {
  __m512i v[16];
  for (int i = 0; i < 16; ++i) {
    const int l = 4 * (i % 4) + i / 4;
    v[i] = l < n ? a[l] : _mm512_setzero_si512();
  }
  __m512i s[8], u[4], x[2];
  for (int i = 0; i < 8; ++i)
    s[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0x44),
                            _mm512_shuffle_i32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(s[2 * i], s[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    x[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(u[2 * i], u[2 * i + 1]),
                            _mm512_unpackhi_epi32(u[2 * i], u[2 * i + 1]));
  _mm512_storeu_si512(out, _mm512_add_epi32(_mm512_unpacklo_epi64(x[0], x[1]),
                                            _mm512_unpackhi_epi64(x[0], x[1])));
}

// ---- w [N, K] (output-major): a register tile of NR output rows by MR activation rows; the
// NR weight rows stream side by side. Rows m beyond the first MR reread them from L1.
template <int MR, int NR, class W>
void nk_tile(const float* x, const W* const* wr, float* y, int64_t nr, int64_t K, int64_t N) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail16(K - k);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load16(wr[r] + k, mk);
    for (int r = 0; r < NR; ++r) prefetch(wr[r] + k + NR * K);  // the next tile's rows
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = load16(x + i * K + k, mk);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  static_assert(MR * NR <= 16, "one hsum16 per tile");
  float sums[16];
  hsum16(&acc[0][0], MR * NR, sums);
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nr; ++r) y[i * N + r] = sums[i * NR + r];
}

#ifdef __AVX512BF16__
// bfloat16 w [N, K] with bfloat16 x (the caller rounded x to bfloat16 already, so taking its top
// 16 bits is exact): vdpbf16ps multiplies 32 pairs and adds them into 16 float32 lanes, a
// quarter of the instructions of widening w to float32 first.
template <int MR, int NR>
void nk_tile_bh(const uint16_t* x, const uint16_t* const* wr, float* y, int64_t nr, int64_t K,
                int64_t N) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t left = K - k;
    const __mmask32 mk = left >= 32 ? ~__mmask32(0) : ((__mmask32(1) << left) - 1);
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mk, wr[r] + k);
    for (int r = 0; r < NR; ++r) prefetch(wr[r] + k + NR * K);  // the next tile's rows
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + i * K + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
  }
  static_assert(MR * NR <= 16, "one hsum16 per tile");
  float sums[16];
  hsum16(&acc[0][0], MR * NR, sums);
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nr; ++r) y[i * N + r] = sums[i * NR + r];
}

#endif

// ---- w [K, N] (input-major): worker c takes the rows [k0, k1) of w, a contiguous stretch of
// memory, and adds x[:, k0:k1] @ w[k0:k1] into its own partial sum p (M x N floats, in L1/L2);
// the partials are added in a fixed order after. Every p[m][j] is one FMA chain in k order,
// however many rows a pass takes, so the grouping below never changes a result's bits.
//
// One row of x: four weight rows per pass, four sequential streams.
template <int R, class W>
inline void kn_rows(const float* x, const W* w, float* p, int64_t K, int64_t N, int64_t k) {
  const W* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (k + r) * N;
  __m512 xb[R];
  for (int r = 0; r < R; ++r) xb[r] = _mm512_set1_ps(x[k + r]);
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 mk = tail16(N - j);
    for (int r = 0; r < R; ++r) prefetch(rows[r] + j + R * N);  // the next R rows
    __m512 acc = _mm512_maskz_loadu_ps(mk, p + j);
    for (int r = 0; r < R; ++r) acc = _mm512_fmadd_ps(xb[r], load16(rows[r] + j, mk), acc);
    _mm512_mask_storeu_ps(p + j, mk, acc);
  }
}

// MM rows of x (2-8): eight weight rows per pass, each 16-column piece loaded into registers
// once and used for all MM rows, so the partial sums move through L1/L2 once per eight weight
// rows rather than once per four (measured 2x faster at 8 rows than rereading w per row).
template <int R, int MM, class W>
inline void kn_rows_multi(const float* x, const W* w, float* p, int64_t K, int64_t N, int64_t k) {
  const W* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = w + (k + r) * N;
  for (int64_t j = 0; j < N; j += 16) {
    const __mmask16 mk = tail16(N - j);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = load16(rows[r] + j, mk);
      prefetch(rows[r] + j + R * N);
    }
    for (int m = 0; m < MM; ++m) {
      float* pm = p + m * N + j;
      const float* xm = x + m * K + k;
      __m512 acc = _mm512_maskz_loadu_ps(mk, pm);
      for (int r = 0; r < R; ++r) acc = _mm512_fmadd_ps(_mm512_set1_ps(xm[r]), wv[r], acc);
      _mm512_mask_storeu_ps(pm, mk, acc);
    }
  }
}

template <int MM, class W>
void kn_part_multi(const float* x, const W* w, float* p, int64_t K, int64_t N, int64_t k0,
                   int64_t k1) {
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) kn_rows_multi<8, MM>(x, w, p, K, N, k);
  for (; k < k1; ++k) kn_rows_multi<1, MM>(x, w, p, K, N, k);
}

template <class W>
void kn_part(const float* x, const W* w, float* p, int64_t M, int64_t K, int64_t N, int64_t k0,
             int64_t k1) {
  std::memset(p, 0, sizeof(float) * M * N);
  if (M == 1) {
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) kn_rows<4>(x, w, p, K, N, k);
    for (; k < k1; ++k) kn_rows<1>(x, w, p, K, N, k);
    return;
  }
  // Rows beyond 8 (never sent by matmul) go through in groups of 8.
  for (int64_t m = 0; m < M; m += 8) {
    const float* xm = x + m * K;
    float* pm = p + m * N;
    switch (std::min<int64_t>(8, M - m)) {
      case 1: kn_part_multi<1>(xm, w, pm, K, N, k0, k1); break;
      case 2: kn_part_multi<2>(xm, w, pm, K, N, k0, k1); break;
      case 3: kn_part_multi<3>(xm, w, pm, K, N, k0, k1); break;
      case 4: kn_part_multi<4>(xm, w, pm, K, N, k0, k1); break;
      case 5: kn_part_multi<5>(xm, w, pm, K, N, k0, k1); break;
      case 6: kn_part_multi<6>(xm, w, pm, K, N, k0, k1); break;
      case 7: kn_part_multi<7>(xm, w, pm, K, N, k0, k1); break;
      default: kn_part_multi<8>(xm, w, pm, K, N, k0, k1); break;
    }
  }
}

// ---- int8: w s8[N, K], x s8[M, K]. VNNI multiplies u8 by s8, so x is shifted to x + 128 and
// 128 * sum(w) is taken off again (both sums are exact in int32).
template <int MR, int NR>
void s8_tile(const uint8_t* xu, const int8_t* const* wr, int32_t* y, int64_t nr, int64_t K,
             int64_t N) {
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  __m512i acc[MR][NR], off[NR];
  for (int r = 0; r < NR; ++r) {
    off[r] = _mm512_setzero_si512();
    for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += 64) {
    const int64_t left = K - k;
    const __mmask64 mk = left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = _mm512_maskz_loadu_epi8(mk, wr[r] + k);
      prefetch(wr[r] + k + NR * K);  // the next tile's rows
      off[r] = _mm512_dpbusd_epi32(off[r], bias, wv[r]);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_maskz_loadu_epi8(mk, xu + i * K + k);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_dpbusd_epi32(acc[i][r], xv, wv[r]);
    }
  }
  static_assert(MR * NR <= 16, "one hsum16 for the tile");
  int32_t sums[32];
  if constexpr (MR * NR + NR <= 16) {  // the offsets ride along in the same tree
    __m512i all[16];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < NR; ++r) all[i * NR + r] = acc[i][r];
    for (int r = 0; r < NR; ++r) all[MR * NR + r] = off[r];
    hsum16(all, MR * NR + NR, sums);
  } else {
    hsum16(&acc[0][0], MR * NR, sums);
    hsum16(off, NR, sums + MR * NR);
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < nr; ++r) y[i * N + r] = sums[i * NR + r] - sums[MR * NR + r];
}

// ---- the output-major driver: tiles of 8 output rows for one activation row (16 accumulators
// with the int8 offsets); 4 output rows by up to 4 activation rows for 2-4 rows; 2 output rows
// by up to 8 activation rows for 5 and more (each weight row is then read once for all 8, where
// two 4x4 passes cost 1.8x the time of one at 8 rows). Tile<MR, NR>::run computes one tile;
// rows of x beyond the first MR reread the tile's weight rows from L1.
template <template <int, int> class Tile, int NR, class X, class W, class Y>
void tile_rows(const X* x, const W* const* wr, Y* y, int64_t mr, int64_t nr, int64_t K,
               int64_t N) {
  switch (mr) {
    case 1: Tile<1, NR>::run(x, wr, y, nr, K, N); break;
    case 2: Tile<2, NR>::run(x, wr, y, nr, K, N); break;
    case 3: Tile<3, NR>::run(x, wr, y, nr, K, N); break;
    case 4: Tile<4, NR>::run(x, wr, y, nr, K, N); break;
    default:
      if constexpr (NR <= 2) {
        switch (mr) {
          case 5: Tile<5, NR>::run(x, wr, y, nr, K, N); break;
          case 6: Tile<6, NR>::run(x, wr, y, nr, K, N); break;
          case 7: Tile<7, NR>::run(x, wr, y, nr, K, N); break;
          default: Tile<8, NR>::run(x, wr, y, nr, K, N); break;
        }
      }
  }
}

template <template <int, int> class Tile, class X, class W, class Y>
void output_major(const X* x, const W* w, Y* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                  int64_t n1) {
  const int NR = M == 1 ? 8 : M >= 5 ? 2 : 4;
  const int MR = NR == 2 ? 8 : 4;
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    const W* wr[8];
    for (int r = 0; r < NR; ++r) wr[r] = w + (n + std::min<int64_t>(r, nr - 1)) * K;
    if (M == 1) {
      Tile<1, 8>::run(x, wr, y + n, nr, K, N);
      continue;
    }
    for (int64_t m = 0; m < M; m += MR) {
      const int64_t mr = std::min<int64_t>(MR, M - m);
      if (NR == 2) tile_rows<Tile, 2>(x + m * K, wr, y + m * N + n, mr, nr, K, N);
      else tile_rows<Tile, 4>(x + m * K, wr, y + m * N + n, mr, nr, K, N);
    }
  }
}

template <int MR, int NR>
struct FloatTile {
  template <class W>
  static void run(const float* x, const W* const* wr, float* y, int64_t nr, int64_t K, int64_t N) {
    nk_tile<MR, NR>(x, wr, y, nr, K, N);
  }
};

template <int MR, int NR>
struct Int8Tile {
  static void run(const uint8_t* x, const int8_t* const* wr, int32_t* y, int64_t nr, int64_t K,
                  int64_t N) {
    s8_tile<MR, NR>(x, wr, y, nr, K, N);
  }
};

#ifdef __AVX512BF16__
template <int MR, int NR>
struct PairTile {
  static void run(const uint16_t* x, const uint16_t* const* wr, float* y, int64_t nr, int64_t K,
                  int64_t N) {
    nk_tile_bh<MR, NR>(x, wr, y, nr, K, N);
  }
};
#endif

// Output range [n0, n1) of chunk c when N is cut into pieces of `step` (a multiple of it).
struct Split {
  int64_t n, step, chunks;
  Split(int64_t n_, int64_t unit, int64_t threads) : n(n_) {
    const int64_t units = (n + unit - 1) / unit;
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(units, 4 * threads));
    step = ((units + want - 1) / want) * unit;
    chunks = (n + step - 1) / step;
  }
  int64_t lo(int64_t c) const { return c * step; }
  int64_t hi(int64_t c) const { return std::min(n, (c + 1) * step); }
};

ffi::Error shapes(ffi::AnyBuffer x, ffi::AnyBuffer w, bool transposed, int64_t* M, int64_t* K,
                  int64_t* N) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 2)
    return ffi::Error::InvalidArgument("jd_matmul: x needs >= 1 dim and w >= 2");
  for (size_t i = 0; i + 2 < wd.size(); ++i)
    if (wd[i] != 1) return ffi::Error::InvalidArgument("jd_matmul: a batched w is not supported");
  *K = xd[xd.size() - 1];
  *M = *K ? int64_t(x.element_count()) / *K : 0;
  const int64_t wk = transposed ? wd[wd.size() - 1] : wd[wd.size() - 2];
  *N = transposed ? wd[wd.size() - 2] : wd[wd.size() - 1];
  if (wk != *K) return ffi::Error::InvalidArgument("jd_matmul: x and w disagree on K");
  return ffi::Error::Success();
}

ffi::Error matmul_f32(ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y, bool transposed) {
  int64_t M, K, N;
  if (auto e = shapes(x, w, transposed, &M, &K, &N); e.failure()) return e;
  if (x.element_type() != ffi::DataType::F32 || y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("jd_matmul_f32: x and y must be float32");
  const float* xp = static_cast<const float*>(x.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  const int64_t threads = Workers::get().size();
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16 && w.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("jd_matmul_f32: w must be float32 or bfloat16");
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(yp, 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  const void* wp = w.untyped_data();
#ifdef __AVX512BF16__
  if (transposed && bf16) {
    std::vector<uint16_t> xh(size_t(M * K));
    for (int64_t i = 0; i < M * K; ++i) {
      uint32_t u;
      std::memcpy(&u, xp + i, 4);
      xh[i] = uint16_t(u >> 16);
    }
    const uint16_t* xhp = xh.data();
    const Split s(N, 16, threads);
    parallel_chunks(s.chunks, [=](int64_t c) {
      output_major<PairTile>(xhp, static_cast<const uint16_t*>(wp), yp, M, K, N, s.lo(c), s.hi(c));
    });
    return ffi::Error::Success();
  }
#endif
  if (transposed) {
    const Split s(N, 16, threads);
    parallel_chunks(s.chunks, [=](int64_t c) {
      bf16 ? output_major<FloatTile>(xp, static_cast<const uint16_t*>(wp), yp, M, K, N, s.lo(c), s.hi(c))
           : output_major<FloatTile>(xp, static_cast<const float*>(wp), yp, M, K, N, s.lo(c), s.hi(c));
    });
    return ffi::Error::Success();
  }
  // One stretch of rows per worker (a multiple of 8 rows, the passes' sizes); worker 0 sums
  // straight into y.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(2 * threads, K / 8));
  const int64_t step = ((K + parts - 1) / parts + 7) / 8 * 8;
  const int64_t used = (K + step - 1) / step;
  std::vector<float> scratch(size_t((used - 1) * M * N));
  float* sp = scratch.data();
  parallel_chunks(used, [=](int64_t c) {
    float* p = c == 0 ? yp : sp + (c - 1) * M * N;
    const int64_t k0 = c * step, k1 = std::min(K, k0 + step);
    bf16 ? kn_part(xp, static_cast<const uint16_t*>(wp), p, M, K, N, k0, k1)
         : kn_part(xp, static_cast<const float*>(wp), p, M, K, N, k0, k1);
  });
  for (int64_t c = 1; c < used; ++c) {
    const float* p = sp + (c - 1) * M * N;
    for (int64_t i = 0; i < M * N; i += 16) {
      const __mmask16 mk = tail16(M * N - i);
      _mm512_mask_storeu_ps(yp + i, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, yp + i),
                                                      _mm512_maskz_loadu_ps(mk, p + i)));
    }
  }
  return ffi::Error::Success();
}

ffi::Error matmul_s8(ffi::AnyBuffer x, ffi::AnyBuffer w,
                     ffi::Result<ffi::AnyBuffer> y) {
  int64_t M, K, N;
  if (auto e = shapes(x, w, true, &M, &K, &N); e.failure()) return e;
  if (x.element_type() != ffi::DataType::S8 || w.element_type() != ffi::DataType::S8 ||
      y->element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("jd_matmul_s8: x and w must be int8 and y int32");
  int32_t* yp = static_cast<int32_t*>(y->untyped_data());
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(yp, 0, sizeof(int32_t) * M * N);
    return ffi::Error::Success();
  }
  // x + 128 as uint8 (flipping the sign bit), once per call.
  auto xu = std::make_shared<std::vector<uint8_t>>(size_t(M * K));
  const auto* xs = static_cast<const uint8_t*>(x.untyped_data());
  for (int64_t i = 0; i < M * K; ++i) (*xu)[i] = xs[i] ^ 0x80;
  const int8_t* wp = static_cast<const int8_t*>(w.untyped_data());
  const int64_t threads = Workers::get().size();
  const Split s(N, 16, threads);
  const uint8_t* xup = xu->data();
  parallel_chunks(s.chunks,
                  [=](int64_t c) { output_major<Int8Tile>(xup, wp, yp, M, K, N, s.lo(c), s.hi(c)); });
  return ffi::Error::Success();
}


// ---- causal self-attention of a prompt (prefill): q f32[B, T, H, hd], k, v f32[B, T, KV, hd]
// -> f32[B, T, H * hd]. Query position t sees keys s <= t (and s > t - window when window > 0).
// XLA runs this as ~8 small ops per query block, most of their time spent moving the score
// matrix between them; here a block of QB positions (times the G query heads of one kv head)
// keeps its scores in L1/L2 from the q.k products through the softmax to the value products.
constexpr int64_t QB = 16;

// e^x for x <= 0, accurate to ~2 ulp (Cephes' expf polynomial; 2^n applied with scalef).
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

struct AttnShape {
  int64_t B, T, H, KV, hd, window;
  float scale;
  int64_t Tp;  // T rounded up to 16: the row length of the transposed keys
};

// One task: batch row b, kv head g, positions [t0, t1). Rows r = (t - t0) * G + (head - g * G).
// kt[(b * KV + g) * hd + d][s] = k[b, s, g, d], zero-padded to Tp columns: the keys of a kv head
// as rows of hd, so a tile of scores is a sum over d of a query value times 16 keys.
void transpose_keys(const float* k, float* kt, const AttnShape& a, int64_t b, int64_t g) {
  float* dst = kt + (b * a.KV + g) * a.hd * a.Tp;
  for (int64_t s = 0; s < a.Tp; ++s) {
    const float* src = k + ((b * a.T + s) * a.KV + g) * a.hd;
    for (int64_t d = 0; d < a.hd; ++d) dst[d * a.Tp + s] = s < a.T ? src[d] : 0.f;
  }
}

template <int HV>
void attend_block(const float* q, const float* ktall, const float* v, float* out, const AttnShape& a,
                  int64_t b, int64_t g, int64_t t0, int64_t t1) {
  constexpr int64_t hd = 16 * HV;
  const int64_t G = a.H / a.KV, R = (t1 - t0) * G;
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, t0 - a.window + 1) : 0;
  const int64_t nk = t1 - lo, nkp = (nk + 15) / 16 * 16;
  thread_local std::vector<float> buf;
  buf.resize(size_t(R * hd + R * nkp + R));
  float* qs = buf.data();       // [R, hd], scaled
  const float* kt = ktall + (b * a.KV + g) * hd * a.Tp + lo;  // [hd, Tp], from key lo
  float* sc = qs + R * hd;      // [R, nkp]: scores, then probabilities
  float* inv = sc + R * nkp;    // [R]: 1 / row sum
  const auto pos = [&](int64_t r) { return t0 + r / G; };
  for (int64_t r = 0; r < R; ++r) {
    const float* src = q + ((b * a.T + pos(r)) * a.H + g * G + r % G) * hd;
    for (int64_t d = 0; d < hd; d += 16)
      _mm512_storeu_ps(qs + r * hd + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), _mm512_set1_ps(a.scale)));
  }
  // scores: tiles of 8 rows x 32 keys, up to the last key the tile's last row may see
  for (int64_t i = 0; i < R; i += 8) {
    const int64_t mr = std::min<int64_t>(8, R - i);
    const int64_t jend = std::min(nkp, (pos(i + mr - 1) - lo + 1 + 15) / 16 * 16);
    for (int64_t j = 0; j < jend; j += 32) {
      const bool two = j + 16 < jend;
      __m512 acc[8][2];
      for (int m = 0; m < 8; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; ++d) {
        const __m512 w0 = _mm512_loadu_ps(kt + d * a.Tp + j);
        const __m512 w1 = two ? _mm512_loadu_ps(kt + d * a.Tp + j + 16) : _mm512_setzero_ps();
        for (int m = 0; m < 8; ++m) {
          const __m512 xb = _mm512_set1_ps(qs[(i + std::min<int64_t>(m, mr - 1)) * hd + d]);
          acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
        }
      }
      for (int m = 0; m < mr; ++m) {
        _mm512_storeu_ps(sc + (i + m) * nkp + j, acc[m][0]);
        if (two) _mm512_storeu_ps(sc + (i + m) * nkp + j + 16, acc[m][1]);
      }
    }
  }
  // softmax over each row's keys [jl, jh); zeros elsewhere up to the row tile's span
  for (int64_t r = 0; r < R; ++r) {
    const int64_t t = pos(r);
    const int64_t jh = t - lo + 1;
    const int64_t jl = a.window > 0 ? std::max<int64_t>(0, t - a.window + 1 - lo) : 0;
    float* row = sc + r * nkp;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = jl; j < jh; j += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail16(jh - j), row + j));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < jl; ++j) row[j] = 0.f;
    for (int64_t j = jl; j < jh; j += 16) {
      const __mmask16 mk = tail16(jh - j);
      const __m512 p = _mm512_maskz_mov_ps(mk, exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row + j), m)));
      sum = _mm512_add_ps(sum, p);
      _mm512_mask_storeu_ps(row + j, mk, p);
    }
    for (int64_t j = jh; j < nkp; ++j) row[j] = 0.f;
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // values: tiles of MR rows x hd, over the keys any row of the tile sees
  constexpr int MR = HV >= 16 ? 1 : 16 / HV;
  for (int64_t i = 0; i < R; i += MR) {
    const int64_t mr = std::min<int64_t>(MR, R - i);
    const int64_t jl = a.window > 0 ? std::max<int64_t>(0, pos(i) - a.window + 1 - lo) : 0;
    const int64_t jh = pos(i + mr - 1) - lo + 1;
    __m512 acc[MR][HV];
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < HV; ++h) acc[m][h] = _mm512_setzero_ps();
    for (int64_t j = jl; j < jh; ++j) {
      const float* vr = v + ((b * a.T + lo + j) * a.KV + g) * hd;
      __m512 vv[HV];
      for (int h = 0; h < HV; ++h) vv[h] = _mm512_loadu_ps(vr + 16 * h);
      for (int m = 0; m < MR; ++m) {
        const __m512 pb = _mm512_set1_ps(sc[(i + std::min<int64_t>(m, mr - 1)) * nkp + j]);
        for (int h = 0; h < HV; ++h) acc[m][h] = _mm512_fmadd_ps(pb, vv[h], acc[m][h]);
      }
    }
    for (int m = 0; m < mr; ++m) {
      const int64_t r = i + m;
      float* dst = out + ((b * a.T + pos(r)) * a.H + g * G + r % G) * hd;
      const __m512 s = _mm512_set1_ps(inv[r]);
      for (int h = 0; h < HV; ++h) _mm512_storeu_ps(dst + 16 * h, _mm512_mul_ps(acc[m][h], s));
    }
  }
}

ffi::Error causal_attention(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::AnyBuffer window, ffi::Result<ffi::AnyBuffer> out, float scale) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || q.element_type() != ffi::DataType::F32 ||
      k.element_type() != ffi::DataType::F32 || v.element_type() != ffi::DataType::F32 ||
      window.element_type() != ffi::DataType::S32 || window.element_count() != 1)
    return ffi::Error::InvalidArgument("jd_causal_attention: q, k, v must be float32 [B, T, heads, hd]");
  AttnShape a{qd[0], qd[1], qd[2], kd[2], qd[3], *static_cast<const int32_t*>(window.untyped_data()),
              scale, (qd[1] + 15) / 16 * 16};
  if (kd[0] != a.B || kd[1] != a.T || kd[3] != a.hd || a.KV == 0 || a.H % a.KV != 0 ||
      (a.hd != 64 && a.hd != 128 && a.hd != 256))
    return ffi::Error::InvalidArgument("jd_causal_attention: unsupported shapes");
  const float* qp = static_cast<const float*>(q.untyped_data());
  const float* kp = static_cast<const float*>(k.untyped_data());
  const float* vp = static_cast<const float*>(v.untyped_data());
  float* op = static_cast<float*>(out->untyped_data());
  const int64_t blocks = (a.T + QB - 1) / QB, pairs = a.B * a.KV;
  // (+16: a window's tile may read up to 15 columns past the last row; those scores are unused)
  std::vector<float> kt(size_t(pairs * a.hd * a.Tp + 16));
  float* ktp = kt.data();
  parallel_chunks(pairs, [=](int64_t c) { transpose_keys(kp, ktp, a, c / a.KV, c % a.KV); });
  // The last query blocks cost the most (they see the most keys): they are handed out first.
  parallel_chunks(blocks * pairs, [=](int64_t c) {
    const int64_t blk = blocks - 1 - c / pairs, b = (c % pairs) / a.KV, g = c % a.KV;
    const int64_t t0 = blk * QB, t1 = std::min(a.T, t0 + QB);
    if (a.hd == 64) attend_block<4>(qp, ktp, vp, op, a, b, g, t0, t1);
    else if (a.hd == 128) attend_block<8>(qp, ktp, vp, op, a, b, g, t0, t1);
    else attend_block<16>(qp, ktp, vp, op, a, b, g, t0, t1);
  });
  return ffi::Error::Success();
}


// ---- one decoding step's attention: q f32[B, H, hd] (one new position per row, at
// positions[b]) over layer i of the cache kc, vc [L, B, KV, S, hd] (f32 or bf16), slots
// max(0, p - window + 1) .. min(p, S) - 1, plus the row's own new key/value kn, vn [B, KV, hd]
// (not yet in the cache) -> f32[B, H * hd]. XLA slices a prefix of the cache, appends the new
// slot (two copies of it per layer) and runs ~8 ops; this reads only the slots a row sees.
template <int HV, class C>
void decode_rows(const float* q, const C* kc, const C* vc, const C* kn, const C* vn, float* out,
                 int64_t H, int64_t KV, int64_t S, int64_t lo, int64_t hi, float scale) {
  constexpr int64_t hd = 16 * HV;
  const int64_t G = H / KV;
  thread_local std::vector<float> sc;
  sc.resize(size_t(G * (hi - lo + 1)));
  const int64_t n = hi - lo + 1;  // cache slots lo..hi-1, then the new one
  for (int64_t g = 0; g < G; ++g) {
    __m512 qv[HV];
    for (int h = 0; h < HV; ++h) qv[h] = _mm512_mul_ps(load16(q + g * hd + 16 * h), _mm512_set1_ps(scale));
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const C* kr = j < n - 1 ? kc + (lo + j) * hd : kn;
      __m512 acc = _mm512_setzero_ps();
      for (int h = 0; h < HV; ++h) acc = _mm512_fmadd_ps(qv[h], load16(kr + 16 * h), acc);
      const float s = _mm512_reduce_add_ps(acc);
      sc[g * n + j] = s;
      mx = std::max(mx, s);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mk = tail16(n - j);
      const __m512 p = _mm512_maskz_mov_ps(mk, exp_nonpos(_mm512_sub_ps(
          _mm512_maskz_loadu_ps(mk, sc.data() + g * n + j), _mm512_set1_ps(mx))));
      _mm512_mask_storeu_ps(sc.data() + g * n + j, mk, p);
      sum += _mm512_reduce_add_ps(p);
    }
    __m512 acc[HV];
    for (int h = 0; h < HV; ++h) acc[h] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const C* vr = j < n - 1 ? vc + (lo + j) * hd : vn;
      const __m512 pb = _mm512_set1_ps(sc[g * n + j]);
      for (int h = 0; h < HV; ++h) acc[h] = _mm512_fmadd_ps(pb, load16(vr + 16 * h), acc[h]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / sum);
    for (int h = 0; h < HV; ++h) _mm512_storeu_ps(out + g * hd + 16 * h, _mm512_mul_ps(acc[h], inv));
  }
}

template <class C>
void decode_attention_impl(const float* q, const C* kc, const C* vc, const C* kn, const C* vn,
                           const int32_t* positions, float* out, int64_t B, int64_t H, int64_t KV,
                           int64_t S, int64_t hd, int64_t layer, int64_t window, float scale) {
  parallel_chunks(B * KV, [=](int64_t c) {
    const int64_t b = c / KV, g = c % KV, G = H / KV;
    const int64_t p = positions[b];
    const int64_t hi = std::max<int64_t>(0, std::min<int64_t>(p, S));
    const int64_t lo = window > 0 ? std::min(hi, std::max<int64_t>(0, p - window + 1)) : 0;
    const int64_t head = ((layer * B + b) * KV + g) * S * hd;  // cache [L, B, KV, S, hd]
    const float* qb = q + (b * H + g * G) * hd;
    const C* knb = kn + (b * KV + g) * hd;
    const C* vnb = vn + (b * KV + g) * hd;
    float* ob = out + (b * H + g * G) * hd;
    if (hd == 64) decode_rows<4>(qb, kc + head, vc + head, knb, vnb, ob, H, KV, S, lo, hi, scale);
    else if (hd == 128) decode_rows<8>(qb, kc + head, vc + head, knb, vnb, ob, H, KV, S, lo, hi, scale);
    else decode_rows<16>(qb, kc + head, vc + head, knb, vnb, ob, H, KV, S, lo, hi, scale);
  });
}

ffi::Error decode_attention(ffi::AnyBuffer q, ffi::AnyBuffer kc, ffi::AnyBuffer vc,
                            ffi::AnyBuffer kn, ffi::AnyBuffer vn, ffi::AnyBuffer positions,
                            ffi::AnyBuffer layer, ffi::AnyBuffer window,
                            ffi::Result<ffi::AnyBuffer> out, float scale) {
  auto qd = q.dimensions();
  auto cd = kc.dimensions();
  const auto ct = kc.element_type();
  if (qd.size() != 3 || cd.size() != 5 || q.element_type() != ffi::DataType::F32 ||
      (ct != ffi::DataType::F32 && ct != ffi::DataType::BF16) || vc.element_type() != ct ||
      kn.element_type() != ct || vn.element_type() != ct ||
      positions.element_type() != ffi::DataType::S32 || layer.element_type() != ffi::DataType::S32 ||
      window.element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("jd_decode_attention: unexpected operand types");
  const int64_t B = qd[0], H = qd[1], hd = qd[2], L = cd[0], KV = cd[2], S = cd[3];
  if (cd[1] != B || cd[4] != hd || KV == 0 || H % KV != 0 || positions.element_count() != B ||
      kn.element_count() != B * KV * hd || (hd != 64 && hd != 128 && hd != 256))
    return ffi::Error::InvalidArgument("jd_decode_attention: unsupported shapes");
  const int64_t i = *static_cast<const int32_t*>(layer.untyped_data());
  if (i < 0 || i >= L) return ffi::Error::InvalidArgument("jd_decode_attention: layer out of range");
  const int64_t w = *static_cast<const int32_t*>(window.untyped_data());
  const float* qp = static_cast<const float*>(q.untyped_data());
  const int32_t* pp = static_cast<const int32_t*>(positions.untyped_data());
  float* op = static_cast<float*>(out->untyped_data());
  if (ct == ffi::DataType::F32)
    decode_attention_impl(qp, static_cast<const float*>(kc.untyped_data()),
                          static_cast<const float*>(vc.untyped_data()),
                          static_cast<const float*>(kn.untyped_data()),
                          static_cast<const float*>(vn.untyped_data()), pp, op, B, H, KV, S, hd, i, w, scale);
  else
    decode_attention_impl(qp, static_cast<const uint16_t*>(kc.untyped_data()),
                          static_cast<const uint16_t*>(vc.untyped_data()),
                          static_cast<const uint16_t*>(kn.untyped_data()),
                          static_cast<const uint16_t*>(vn.untyped_data()), pp, op, B, H, KV, S, hd, i, w, scale);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jd_matmul_f32, matmul_f32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jd_matmul_s8, matmul_s8,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jd_causal_attention, causal_attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jd_decode_attention, decode_attention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale"));

extern "C" int jd_kernel_version() { return 1; }
