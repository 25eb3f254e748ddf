// The fastest a batch-1 decode step of the `small` preset can read its weights on this machine:
// the step's sequence of one-row products (x · W, W stored [K, N] row-major, f32) and nothing
// else — no attention over the cache, no norms, no routing, no allocation, no thread wake-ups
// (the threads spin between products). What `scripts/bench-infer.sh` calls the bandwidth limit
// assumes the weights stream at the copy bandwidth; this measures how close one product after
// another gets (BENCHMARKS.md, "Inference", twelfth session).
//   gcc -O3 -mavx2 -mfma -pthread scripts/decode-stream.c -o /tmp/decode-stream && /tmp/decode-stream
// Per step (93.4 MB, as bench_infer_hf.py counts it, less norms and one embedding row): each of
// 6 layers reads q_a_proj [512, 192], q_b_proj [192, 576], kv_a_proj_with_mqa [512, 152],
// kv_b_proj [128, 768], o_proj [384, 512]; layer 0 a dense SwiGLU MLP (512 → 1408 → 512); layers
// 1-5 the router [512, 32], one shared expert and 4 of 32 routed experts (512 → 352 → 512,
// 4 distinct ones drawn at random each step); then lm_head [512, 8000]: 114 products. All 32
// experts are allocated (396 MB in all), so the step reads from memory, not from the 32 MB L3.
// The product is the loop of this project's one-row kernel (backends/src/flex.rs, m = 1): eight
// weight rows per pass, eight columns per multiply-add vector, output blocks of 1024 columns.
// Two ways to use two threads: split the columns (each thread reads every row, its half of
// each), as the kernel does; or split the rows (each thread reads a contiguous half of W into
// its own partial output; the halves are then summed), which a fused decode step could do.
// Prints best and median step time over 200 steps (after 10 warm-up steps) for each.
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  int k, n;
  float *w;
} Mat;

enum { MAXM = 1024, STEPS = 210, WARM = 10 };
static Mat mats[MAXM];
static int nmats, plan[MAXM], nplan, threads, rows_split;
static int layer[7];  // index of each layer's first matrix; layer[6] = lm_head
static float x[8192], y[2][8192];
static atomic_int arrived, started;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int add(int k, int n) {
  Mat *m = &mats[nmats];
  m->k = k;
  m->n = n;
  m->w = aligned_alloc(64, (size_t)k * n * sizeof(float));
  for (size_t i = 0; i < (size_t)k * n; i++) m->w[i] = (float)(i % 13) * 0.01f;
  return nmats++;
}

// out[c0..c1] = x[r0..r1] · W[r0..r1, c0..c1] (rows in passes of eight, tail rows last).
__attribute__((target("avx2,fma"))) static void product(const Mat *m, int r0, int r1, int c0,
                                                         int c1, float *out) {
  memset(out + c0, 0, (c1 - c0) * sizeof(float));
  for (int b = c0; b < c1; b += 1024) {
    int len = c1 - b < 1024 ? c1 - b : 1024;
    int i = r0;
    for (; i + 8 <= r1; i += 8) {
      const float *p[8];
      __m256 xs[8];
      for (int j = 0; j < 8; j++) {
        p[j] = m->w + (size_t)(i + j) * m->n + b;
        xs[j] = _mm256_set1_ps(x[i + j]);
      }
      int c = 0;
      for (; c + 8 <= len; c += 8) {
        __m256 acc = _mm256_loadu_ps(out + b + c);
        for (int j = 0; j < 8; j++) acc = _mm256_fmadd_ps(xs[j], _mm256_loadu_ps(p[j] + c), acc);
        _mm256_storeu_ps(out + b + c, acc);
      }
      for (; c < len; c++)
        for (int j = 0; j < 8; j++) out[b + c] += x[i + j] * p[j][c];
    }
    for (; i < r1; i++)
      for (int c = 0; c < len; c++) out[b + c] += x[i] * m->w[(size_t)i * m->n + b + c];
  }
}

// Every thread spins here until all have arrived `*round` times in total.
static void barrier(int *round) {
  *round += 1;
  atomic_fetch_add(&arrived, 1);
  while (atomic_load(&arrived) < *round * threads) _mm_pause();
}

// Thread `t`'s share of one step: every product of the plan, a barrier after each.
static void step(int t, int *round) {
  for (int s = 0; s < nplan; s++) {
    const Mat *m = &mats[plan[s]];
    if (threads == 1) {
      product(m, 0, m->k, 0, m->n, y[0]);
    } else if (!rows_split) {
      int half = (m->n / 2 + 7) / 8 * 8;
      product(m, 0, m->k, t ? half : 0, t ? m->n : half, y[0]);
      barrier(round);
    } else {
      int half = (m->k / 2 + 7) / 8 * 8;
      product(m, t ? half : 0, t ? m->k : half, 0, m->n, y[t]);
      barrier(round);
      int c0 = t ? m->n / 2 : 0, c1 = t ? m->n : m->n / 2;  // sum the partials, half each
      for (int c = c0; c < c1; c++) y[0][c] += y[1][c];
      barrier(round);
    }
  }
}

static void *helper(void *arg) {
  (void)arg;
  int round = 0;
  for (int s = 1; s <= STEPS; s++) {
    while (atomic_load(&started) < s) _mm_pause();
    step(1, &round);
  }
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double d = *(const double *)a - *(const double *)b;
  return (d > 0) - (d < 0);
}

static void measure(int nthreads, int split_rows, const char *what) {
  threads = nthreads;
  rows_split = split_rows;
  atomic_store(&arrived, 0);
  atomic_store(&started, 0);
  pthread_t th;
  if (threads == 2) pthread_create(&th, NULL, helper, NULL);
  srand(1);
  double times[STEPS];
  size_t bytes = 0;
  int round = 0;
  for (int s = 1; s <= STEPS; s++) {
    // The plan of this step: layer by layer, 4 random experts per MoE layer, lm_head last.
    nplan = 0;
    for (int l = 0; l < 6; l++) {
      int fixed = l == 0 ? 8 : 9;  // attention (5) + dense MLP (3), or router + shared (4)
      for (int q = 0; q < fixed; q++) plan[nplan++] = layer[l] + q;
      int chosen[4];
      for (int e = 0; l > 0 && e < 4; e++) {
        int x, dup;
        do {  // 4 distinct experts, as the router picks them
          x = rand() % 32;
          dup = 0;
          for (int d = 0; d < e; d++) dup |= chosen[d] == x;
        } while (dup);
        chosen[e] = x;
        for (int q = 0; q < 3; q++) plan[nplan++] = layer[l] + fixed + 3 * x + q;
      }
    }
    plan[nplan++] = layer[6];
    bytes = 0;
    for (int p = 0; p < nplan; p++) bytes += (size_t)mats[plan[p]].k * mats[plan[p]].n * 4;
    double t0 = now();
    atomic_store(&started, s);
    step(0, &round);
    times[s - 1] = now() - t0;
  }
  if (threads == 2) pthread_join(th, NULL);
  qsort(times + WARM, STEPS - WARM, sizeof(double), cmp);
  double best = times[WARM], median = times[WARM + (STEPS - WARM) / 2];
  printf("%-34s %6.1f MB  best %5.2f ms (%4.1f GB/s, %3.0f tok/s)  median %5.2f ms (%4.1f GB/s, "
         "%3.0f tok/s)\n",
         what, bytes / 1e6, best * 1e3, bytes / best / 1e9, 1 / best, median * 1e3,
         bytes / median / 1e9, 1 / median);
}

int main(void) {
  for (int i = 0; i < 8192; i++) x[i] = 1e-3f * (float)(i % 97);
  for (int l = 0; l < 6; l++) {
    layer[l] = add(512, 192);
    add(192, 576);
    add(512, 152);
    add(128, 768);
    add(384, 512);
    if (l == 0) {
      add(512, 1408), add(512, 1408), add(1408, 512);
    } else {
      add(512, 32);
      add(512, 352), add(512, 352), add(352, 512);
      for (int e = 0; e < 32; e++) add(512, 352), add(512, 352), add(352, 512);
    }
  }
  layer[6] = add(512, 8000);
  measure(1, 0, "1 thread");
  measure(2, 0, "2 threads, columns split (ours)");
  measure(2, 1, "2 threads, rows split");
  return 0;
}
