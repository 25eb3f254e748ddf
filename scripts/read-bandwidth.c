// Read and copy bandwidth of this machine's memory with 1 and 2 threads: the ceiling of decode,
// which reads every weight once per step (BENCHMARKS.md, "Inference").
//   gcc -O3 -mavx2 -pthread scripts/read-bandwidth.c -o /tmp/read-bandwidth && /tmp/read-bandwidth
// Read: each thread sums its half of a 512 MiB float array with four AVX2 accumulators (best of 5).
// Copy: memcpy of the halves, read + write bytes counted (as STREAM and bench-infer.sh count).
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N (128u << 20)
static float *a, *b;
static int threads;
volatile float sink[8];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *read_part(void *p) {
  long i = (long)p;
  size_t n = N / threads, s = i * n;
  __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0;
  for (size_t j = s; j < s + n; j += 32) {
    x0 = _mm256_add_ps(x0, _mm256_load_ps(a + j));
    x1 = _mm256_add_ps(x1, _mm256_load_ps(a + j + 8));
    x2 = _mm256_add_ps(x2, _mm256_load_ps(a + j + 16));
    x3 = _mm256_add_ps(x3, _mm256_load_ps(a + j + 24));
  }
  float o[8];
  _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)));
  sink[i] = o[0] + o[1] + o[2] + o[3] + o[4] + o[5] + o[6] + o[7];
  return 0;
}

static void *copy_part(void *p) {
  long i = (long)p;
  size_t n = N / threads, s = i * n;
  memcpy(b + s, a + s, n * sizeof(float));
  return 0;
}

static double best_of_5(void *(*f)(void *)) {
  pthread_t th[2];
  double best = 1e9;
  for (int r = 0; r < 5; r++) {
    double t = now();
    for (long i = 0; i < threads; i++) pthread_create(&th[i], 0, f, (void *)i);
    for (int i = 0; i < threads; i++) pthread_join(th[i], 0);
    t = now() - t;
    if (t < best) best = t;
  }
  return best;
}

int main(void) {
  a = aligned_alloc(64, (size_t)N * sizeof(float));
  b = aligned_alloc(64, (size_t)N * sizeof(float));
  for (size_t i = 0; i < N; i++) a[i] = 1, b[i] = 0;
  for (threads = 1; threads <= 2; threads++) {
    double r = best_of_5(read_part), c = best_of_5(copy_part);
    printf("%d thread(s): read %.1f GB/s, copy %.1f GB/s (read + write counted)\n", threads,
           N * 4.0 / r / 1e9, 2 * N * 4.0 / c / 1e9);
  }
  return 0;
}
