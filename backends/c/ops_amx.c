/* matmul_ternary on AMX-INT8 tiles (Intel Sapphire Rapids and later), for several activation rows
 * (a prompt, a decode batch). One tdpbusd multiplies a 16 x 64 tile of u8 by a 64 x 16 tile of s8
 * into 16 x 16 int32 sums: 16 times the products of one VNNI instruction. The weight codes
 * (q + 1 in {0, 1, 2}, u8) are the A operand, the int8 activations the B operand, so the sums are
 * the same integers as the other kernels' (sum of code * x, minus sum of x afterwards) and the
 * results the same bits.
 *
 * Compiled with AMX and AVX-512 flags; called only where hybrit_c_amx_usable() says the CPU has
 * AMX-INT8 and Linux granted this process the tile state (arch_prctl, Linux 5.16 and later). */
#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hybrit_c.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* K chunks (64 activation bytes each) summed in the int32 tiles before they are added into int64:
 * a chunk adds at most 64 * 2 * 128 to a sum, so 8192 chunks stay far below 2^31. */
#define AMX_SEGMENT_CHUNKS 8192

static int amx_granted;
static int amx_enabled = 1;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void probe_amx(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
  if (!((d >> 24) & 1) || !((d >> 25) & 1)) return; /* AMX-TILE, AMX-INT8 */
  amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int hybrit_c_amx_usable(void) {
  pthread_once(&amx_once, probe_amx);
  return amx_granted && amx_enabled;
}

void hybrit_c_set_amx(int enabled) { amx_enabled = enabled; }

int hybrit_c_ternary_uses_amx(const hybrit_c_kernels* kr, int64_t m) {
  return kr->isa == HYBRIT_ISA_AVX512 && m >= HYBRIT_AMX_MIN_ROWS && hybrit_c_amx_usable();
}

int64_t hybrit_ternary_amx_bytes(int64_t m, int64_t k) { return (m + 15) / 16 * 16 * hybrit_ternary_padded(k); }

void hybrit_c_ternary_amx_layout(const int8_t* x_blocked, int64_t m, int64_t k, int8_t* x_amx, int64_t tile_begin, int64_t tile_end) {
  const int64_t kp = hybrit_ternary_padded(k), chunks = kp / 64;
  for (int64_t t = tile_begin; t < tile_end; ++t)
    for (int64_t kk = 0; kk < chunks; ++kk) {
      int8_t* tile = x_amx + (t * chunks + kk) * 1024;
      for (int i = 0; i < 16; ++i) {
        const int64_t row = t * 16 + i;
        for (int g = 0; g < 16; ++g) {
          int32_t four = 0;
          if (row < m) memcpy(&four, x_blocked + row * kp + kk * 64 + 4 * g, 4);
          memcpy(tile + g * 64 + i * 4, &four, 4);
        }
      }
    }
}

/* The A tiles of up to 32 weight rows, packed blocks [blk0, blk1): chunk c = (blk - blk0) * 4 + t
 * (field t of packed block blk: the codes meeting activation bytes blk * 256 + t * 64 ...) of
 * weight tile wt lands at out[(wt * out_chunks + c) * 1024 + row * 64]. Rows past `rows` are zero
 * codes, and so are bytes past a row's end (the masked load), which meet zero activation padding. */
static void decode_blocks(const uint8_t* w, int64_t nbytes, int64_t rows, int64_t blk0, int64_t blk1, uint8_t* out, int64_t out_chunks) {
  const __m512i three = _mm512_set1_epi8(3);
  for (int64_t r = 0; r < 32; ++r) {
    uint8_t* base = out + (r / 16) * out_chunks * 1024 + (r % 16) * 64;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t left = nbytes - blk * 64;
      const __mmask64 mask = r >= rows ? 0 : left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
      const __m512i p = _mm512_maskz_loadu_epi8(mask, (const void*)(w + r * nbytes + blk * 64));
      for (int t = 0; t < 4; ++t)
        _mm512_storeu_si512((void*)(base + ((blk - blk0) * 4 + t) * 1024), _mm512_and_si512(_mm512_srli_epi16(p, (unsigned)(2 * t)), three));
    }
  }
}

/* One K chunk into the sum tiles: weight tiles a0 (and a1), activation tiles b0 (and b1). */
static inline __attribute__((always_inline)) void chunk_product(const uint8_t* a0, const uint8_t* a1, const int8_t* b0, const int8_t* b1, int two_w,
                                                                int two_a) {
  _tile_loadd(4, a0, 64);
  _tile_loadd(6, b0, 64);
  _tile_dpbusd(0, 4, 6);
  if (two_a) {
    _tile_loadd(7, b1, 64);
    _tile_dpbusd(1, 4, 7);
  }
  if (two_w) {
    _tile_loadd(5, a1, 64);
    _tile_dpbusd(2, 5, 6);
    if (two_a) _tile_dpbusd(3, 5, 7);
  }
}

static void zero_sum_tiles(void) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

/* The int32 sum tiles added into int64 totals (then zeroed again by the caller's next segment). */
static void add_sum_tiles(int64_t totals[4][256]) {
  int32_t sums[4][256];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  _tile_stored(2, sums[2], 64);
  _tile_stored(3, sums[3], 64);
  for (int q = 0; q < 4; ++q)
    for (int e = 0; e < 256; ++e) totals[q][e] += sums[q][e];
}

/* Sum tile q holds (weight row wr, activation a) at [wr * 16 + a]: y for weight rows r0 + [0, rows)
 * and activation tiles t0 (and t0 + 1). */
static void write_rows(const int64_t totals[4][256], const int64_t* x_sums, const float* x_scales, int64_t m, float w_scale, int64_t r0,
                       int64_t rows, int64_t t0, int two_a, float* y, int64_t ldy) {
  for (int q = 0; q < 4; ++q) {
    const int64_t wbase = (q >> 1) * 16, abase = (t0 + (q & 1)) * 16;
    if (wbase >= rows || ((q & 1) && !two_a)) continue;
    for (int64_t a = 0; a < 16 && abase + a < m; ++a) {
      const int64_t i = abase + a;
      const double factor = (double)w_scale / (double)x_scales[i];
      for (int64_t wr = 0; wr < 16 && wbase + wr < rows; ++wr)
        y[i * ldy + r0 + wbase + wr] = (float)((double)(totals[q][wr * 16 + a] - x_sums[i]) * factor);
    }
  }
}

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_config;

int hybrit_c_ternary_rows_amx(const int8_t* x_amx, const int64_t* x_sums, const float* x_scales, int64_t m, int64_t k, const uint8_t* w,
                              float w_scale, int64_t n_begin, int64_t n_end, float* y, int64_t ldy) {
  const int64_t kp = hybrit_ternary_padded(k), chunks = kp / 64, blocks = chunks / 4, nbytes = hybrit_packed_cols(k), tiles = (m + 15) / 16;
  /* Up to 32 activation rows (one pair of tiles): each weight block is decoded right before its
   * four chunks are multiplied (8 KiB staged in L1). More rows: a 32-row panel decoded whole, then
   * multiplied by every pair of activation tiles. */
  const int streaming = tiles <= 2;
  const int64_t staged_chunks = streaming ? 4 : chunks; /* chunks held per weight tile */
  uint8_t* staged = (uint8_t*)malloc((size_t)(2 * staged_chunks * 1024));
  if (!staged) return HYBRIT_C_NOMEM;
  /* Tiles 0-3: the int32 sums of (weight tile, activation tile) (0, 0), (0, 1), (1, 0), (1, 1);
   * 4-5: weight codes; 6-7: activations. Every tile 16 rows of 64 bytes. */
  amx_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  int64_t totals[4][256];
  for (int64_t r0 = n_begin; r0 < n_end; r0 += 32) {
    const int64_t rows = n_end - r0 < 32 ? n_end - r0 : 32;
    const int two_w = rows > 16;
    const uint8_t* panel = w + r0 * nbytes;
    if (!streaming) decode_blocks(panel, nbytes, rows, 0, blocks, staged, chunks);
    for (int64_t t0 = 0; t0 < tiles; t0 += 2) { /* streaming: one pass, so each block is decoded once */
      const int two_a = t0 + 1 < tiles;
      memset(totals, 0, sizeof totals);
      for (int64_t seg = 0; seg < chunks; seg += AMX_SEGMENT_CHUNKS) { /* a multiple of 4: blocks stay whole */
        const int64_t seg_end = chunks - seg < AMX_SEGMENT_CHUNKS ? chunks : seg + AMX_SEGMENT_CHUNKS;
        zero_sum_tiles();
        for (int64_t kk = seg; kk < seg_end; ++kk) {
          if (streaming && kk % 4 == 0) decode_blocks(panel, nbytes, rows, kk / 4, kk / 4 + 1, staged, 4);
          const uint8_t* codes = staged + (streaming ? kk % 4 : kk) * 1024;
          chunk_product(codes, codes + staged_chunks * 1024, x_amx + (t0 * chunks + kk) * 1024, x_amx + ((t0 + 1) * chunks + kk) * 1024, two_w,
                        two_a);
        }
        add_sum_tiles(totals);
      }
      write_rows(totals, x_sums, x_scales, m, w_scale, r0, rows, t0, two_a, y, ldy);
    }
  }
  _tile_release();
  free(staged);
  return HYBRIT_C_OK;
}
