/* GSM's host kernels for float32 arrays in host memory, as a CPython extension module (gsm._host_kernels,
   called by gsm/host_kernels.py, which checks every tensor before its address gets here).

   The exact Q-th largest metric tau of |w * g| (NaN included: it ranks above every number) is found by the
   bit patterns of the metrics, which order non-negative floats as integers, in buckets of their high and low
   16 bits, without a buffer of every metric:
   candidates: one pass over the weights and gradients that counts the metrics at or above a bound by their
   high 16 bits and keeps them, up to a capacity; kth_in_bucket then selects tau among the kept ones of the
   bucket that the counts point to. When more pass the bound than the capacity holds, bucket_lows, one more
   pass, counts the metrics of that bucket by their low 16 bits instead, which gives tau as well.
   update: one pass that applies the momentum-SGD update with the loss gradient only where |w * g| >= tau (or
   is NaN), in torch.optim.SGD's order of operations (d = mask * g + wd * w; b = momentum * b + d; w -= lr * b,
   or w -= lr * (d + momentum * b) with Nesterov), without building a mask or a masked gradient.

   They split large work over the threads of torch's own OpenMP pool, through the GOMP_parallel entry point of
   the runtime that use_openmp is given (the pool whose threads torch's operators use, and which
   gsm.flush_denormals has set to flush subnormals to zero); without it they run on the calling thread. Every
   element's arithmetic is the same whatever the number of threads, so the counts and tau do not depend on it
   (only the order in which the candidates are kept does). Each kernel has an AVX2 version chosen at run time
   on x86-64; it performs the same IEEE operations as the portable version (the package builds with
   -ffp-contract=off: no fused multiply-add anywhere), so the results do not depend on the processor either.

   The Python-facing functions check what they can see (lengths, sizes, alignment, the output buffers' types,
   sizes and room, overlaps between the memory they write and any other they touch) and raise ValueError or
   TypeError before any kernel runs. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GSM_X86 1
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* ---- threads ----------------------------------------------------------------------------------------- */

typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel = NULL;
static omp_int_fn omp_thread_num = NULL;
static omp_int_fn omp_num_threads = NULL;

#define MAX_THREADS 256
/* Below this many elements a kernel runs on one thread: a parallel region costs a few microseconds. */
#define MIN_PARALLEL_ELEMENTS 65536

/* The arrays of one call, viewed as one index space [0, total) of consecutive segments. */
struct arrays {
    Py_ssize_t count;
    float *const *w;
    const float *const *g;
    float *const *b; /* NULL, or b[t] == NULL: no momentum for that array */
    const int64_t *sizes;
    int64_t total;
};

#ifdef GSM_X86
/* Whether the AVX2 versions run: set at import on processors that have AVX2 (and POPCNT). */
static int use_avx2 = 0;
#endif

/* How many threads a kernel over `total` elements asks for, given torch's `threads`: in [1, MAX_THREADS]. */
static int thread_count(int64_t total, long threads)
{
    if (total < MIN_PARALLEL_ELEMENTS || threads < 1)
        return 1;
    return threads > MAX_THREADS ? MAX_THREADS : (int)threads;
}

/* Calls fn(job) on `threads` threads of the pool (each finds its share with `share`), or on this one. */
static void run(void (*fn)(void *), void *job, int *parallel, int threads)
{
    *parallel = gomp_parallel != NULL && threads > 1;
    if (*parallel)
        gomp_parallel(fn, job, (unsigned)threads, 0);
    else
        fn(job);
}

static int last_threads = 0;

/* This thread's index and share [*lo, *hi) of the index space (8-aligned cuts). */
static void share(int parallel, int64_t total, int *index, int64_t *lo, int64_t *hi)
{
    int me = parallel ? omp_thread_num() : 0, of = parallel ? omp_num_threads() : 1;
    if (me == 0)
        last_threads = of;
    int64_t blocks = (total + 7) / 8;
    *index = me;
    *lo = blocks * me / of * 8;
    *hi = blocks * (me + 1) / of * 8;
    if (*hi > total)
        *hi = total;
    if (*lo > total)
        *lo = total;
}

/* The part [*from, *to) of array t, which starts at index `offset` of the index space, inside the share
   [lo, hi); whether it is not empty. */
static int segment(const struct arrays *a, Py_ssize_t t, int64_t offset, int64_t lo, int64_t hi, int64_t *from,
                   int64_t *to)
{
    *from = lo > offset ? lo - offset : 0;
    *to = hi - offset < a->sizes[t] ? hi - offset : a->sizes[t];
    return *from < *to;
}

/* ---- candidates -------------------------------------------------------------------------------------- */

/* The buckets of a metric's bit pattern: its high 16 bits (the sign bit is 0, so below 2^15) and its low 16. */
#define HIGH_BUCKETS 32768
#define LOW_BUCKETS 65536
/* Candidates a thread gathers in a buffer of its own before it hands them over to the shared output. */
#define STAGE 1024
/* A thread counts the candidates by their high bits into this many tables in turn: successive increments of
   one bucket then rarely wait for each other. */
#define TABLES 4
/* A thread's uint32 counts are added to the shared int64 histogram before they could overflow. */
#define MERGE_EVERY ((int64_t)1 << 31)

/* w * g, with w the first operand of the multiply. When both are NaN, the processor returns the first
   operand's NaN (on x86), and compilers order the operands of a product as they see fit, differently from one
   loop to another; the ranking orders NaNs by their bit patterns, so every kernel that computes a metric for
   the ranking takes this order, on x86 by naming the instruction. */
static ALWAYS_INLINE float product(float w, float g)
{
#ifdef GSM_X86
    __asm__("mulss %1, %0" : "+x"(w) : "x"(g)); /* w = w * g */
    return w;
#else
    return w * g;
#endif
}

/* A metric is a candidate when it is not below the bound: NaN is (it ranks above every number, as in
   torch.topk). */
static ALWAYS_INLINE int64_t candidates_portable(const float *w, const float *g, int64_t n, float bound, float *out)
{
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        float m = fabsf(product(w[i], g[i]));
        out[found] = m; /* kept only when it passes: the next write goes to the same place otherwise */
        found += !(m < bound);
    }
    return found;
}

#ifdef GSM_X86
/* For each 8-bit mask, the lanes it selects in order, then the others: a permutation that moves the selected
   lanes of an 8-float vector to its front (a left pack). */
static int32_t pack_order[256][8];

static void fill_pack_order(void)
{
    for (int mask = 0; mask < 256; mask++) {
        int next = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1)
                pack_order[mask][next++] = lane;
        for (int lane = 0; lane < 8; lane++)
            if (!(mask >> lane & 1))
                pack_order[mask][next++] = lane;
    }
}

/* The metrics |w * g| of 8 elements, computed as candidates_portable and bucket_lows_portable compute them
   (w the first operand, see `product`). */
__attribute__((target("avx2")))
static ALWAYS_INLINE __m256 metric8(const float *w, const float *g)
{
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m;
    __asm__("vmulps %2, %1, %0" : "=x"(m) : "x"(_mm256_loadu_ps(w)), "x"(_mm256_loadu_ps(g))); /* m = w * g */
    return _mm256_and_ps(m, magnitude);
}

/* Writes at most 7 floats past the candidates found, never past out + n. */
__attribute__((target("avx2,popcnt")))
static int64_t candidates_avx2(const float *w, const float *g, int64_t n, float bound, float *out)
{
    const __m256 at_least = _mm256_set1_ps(bound);
    int64_t found = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 m = metric8(w + i, g + i);
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(m, at_least, _CMP_NLT_UQ)); /* not below; NaN passes */
        if (mask) {
            __m256i order = _mm256_loadu_si256((const __m256i *)pack_order[mask]);
            _mm256_storeu_ps(out + found, _mm256_permutevar8x32_ps(m, order));
            found += __builtin_popcount(mask);
        }
    }
    return found + candidates_portable(w + i, g + i, n - i, bound, out + found);
}
#endif

/* Adds a thread's non-zero counts to the shared histogram and zeroes them. */
static void merge_counts(uint32_t *counts, int buckets, int64_t *histogram)
{
    for (int b = 0; b < buckets; b++)
        if (counts[b]) {
            __atomic_fetch_add(&histogram[b], (int64_t)counts[b], __ATOMIC_RELAXED);
            counts[b] = 0;
        }
}

struct candidates_job {
    struct arrays a;
    float bound;
    float *out;
    int64_t capacity; /* the floats `out` holds: writing stops there, counting goes on */
    int64_t cursor;   /* the candidates handed over so far by every thread, the next one's place in `out` */
    uint32_t *counts; /* per thread, TABLES tables of HIGH_BUCKETS counts */
    int64_t *histogram;
    int parallel;
};

/* Hands `n` staged candidates over: reserves their places in `out` (a fetch-add on the shared cursor, so that
   threads never write the same place), copies those that fit below the capacity, and counts them by their
   high 16 bits into the thread's TABLES tables of HIGH_BUCKETS counts (unless `counts` is NULL). */
static void hand_over(struct candidates_job *job, const float *stage, int64_t n, uint32_t *counts)
{
    int64_t at = __atomic_fetch_add(&job->cursor, n, __ATOMIC_RELAXED);
    if (at < job->capacity)
        memcpy(job->out + at, stage, (size_t)(n < job->capacity - at ? n : job->capacity - at) * sizeof(float));
    if (counts == NULL)
        return;
    int64_t i = 0;
    for (; i + TABLES <= n; i += TABLES) {
        uint32_t bits[TABLES];
        memcpy(bits, &stage[i], sizeof bits);
        for (int table = 0; table < TABLES; table++)
            counts[table * HIGH_BUCKETS + (bits[table] >> 16)]++;
    }
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &stage[i], sizeof bits);
        counts[bits >> 16]++;
    }
}

/* Adds a thread's TABLES tables of counts to the shared histogram and zeroes them (none when NULL). */
static void merge_tables(uint32_t *counts, int64_t *histogram)
{
    if (counts == NULL)
        return;
    for (int table = 0; table < TABLES; table++)
        merge_counts(counts + (size_t)table * HIGH_BUCKETS, HIGH_BUCKETS, histogram);
}

/* Each thread gathers the candidates of its share in a small buffer on its stack and hands them over when it
   is half full, so that the output needs room for the candidates alone, in the order the threads hand them
   over. */
static void candidates_share(void *data)
{
    struct candidates_job *job = data;
    const struct arrays *a = &job->a;
    float stage[STAGE];
    int me;
    int64_t lo, hi, from, to, offset = 0, staged = 0, unmerged = 0;
    share(job->parallel, a->total, &me, &lo, &hi);
    uint32_t *counts = job->counts == NULL ? NULL : job->counts + (size_t)me * TABLES * HIGH_BUCKETS;
    for (Py_ssize_t t = 0; t < a->count && offset < hi; offset += a->sizes[t], t++) {
        if (!segment(a, t, offset, lo, hi, &from, &to))
            continue;
        for (int64_t i = from; i < to;) {
            /* at most STAGE - staged elements, so that their candidates (and the vector version's spill) fit, and
               a multiple of 8 but at the end of the segment, so that the vector version leaves no elements to
               its scalar tail but there */
            int64_t room = (STAGE - staged) / 8 * 8;
            int64_t n = to - i < room ? to - i : room;
#ifdef GSM_X86
            if (use_avx2)
                staged += candidates_avx2(a->w[t] + i, a->g[t] + i, n, job->bound, stage + staged);
            else
#endif
                staged += candidates_portable(a->w[t] + i, a->g[t] + i, n, job->bound, stage + staged);
            i += n;
            if (staged >= STAGE / 2) {
                hand_over(job, stage, staged, counts);
                unmerged += staged;
                staged = 0;
                if (unmerged >= MERGE_EVERY - STAGE) {
                    merge_tables(counts, job->histogram);
                    unmerged = 0;
                }
            }
        }
    }
    hand_over(job, stage, staged, counts);
    merge_tables(counts, job->histogram);
}

/* Writes at most `capacity` candidates of the arrays to `out`, in no fixed order, counts every candidate by its
   high 16 bits into `histogram` (HIGH_BUCKETS, overwritten; NULL: no counts, and no tables to allocate and
   merge, for a search among few candidates), and returns their exact number, also when it is above the
   capacity; -1 when the threads' counts cannot be allocated. */
static int64_t collect_candidates(struct arrays a, float bound, float *out, int64_t capacity, int64_t *histogram,
                                  long threads)
{
    struct candidates_job job;
    job.a = a;
    job.bound = bound;
    job.out = out;
    job.capacity = capacity;
    job.cursor = 0;
    job.histogram = histogram;
    int count = thread_count(a.total, threads);
    job.counts = NULL;
    if (histogram != NULL) {
        job.counts = PyMem_RawCalloc((size_t)count * TABLES * HIGH_BUCKETS, sizeof(uint32_t));
        if (job.counts == NULL)
            return -1;
        memset(histogram, 0, HIGH_BUCKETS * sizeof(int64_t));
    }
    run(candidates_share, &job, &job.parallel, count);
    PyMem_RawFree(job.counts);
    return job.cursor;
}

/* ---- bucket_lows ------------------------------------------------------------------------------------- */

/* Counts by their low 16 bits the metrics of the elements whose high 16 bits are `high`. */
static ALWAYS_INLINE void bucket_lows_portable(const float *w, const float *g, int64_t n, uint32_t high,
                                               uint32_t *counts)
{
    for (int64_t i = 0; i < n; i++) {
        float m = fabsf(product(w[i], g[i]));
        uint32_t bits;
        memcpy(&bits, &m, sizeof bits);
        if (bits >> 16 == high)
            counts[bits & 0xffff]++;
    }
}

#ifdef GSM_X86
__attribute__((target("avx2")))
static void bucket_lows_avx2(const float *w, const float *g, int64_t n, uint32_t high, uint32_t *counts)
{
    const __m256i wanted = _mm256_set1_epi32((int)high);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i bits = _mm256_castps_si256(metric8(w + i, g + i));
        int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(bits, 16), wanted)));
        if (mask) {
            uint32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, bits);
            for (; mask; mask &= mask - 1)
                counts[lanes[__builtin_ctz(mask)] & 0xffff]++;
        }
    }
    bucket_lows_portable(w + i, g + i, n - i, high, counts);
}
#endif

struct bucket_lows_job {
    struct arrays a;
    uint32_t high;
    uint32_t *counts; /* per thread, LOW_BUCKETS counts */
    int64_t *histogram;
    int parallel;
};

static void bucket_lows_share(void *data)
{
    struct bucket_lows_job *job = data;
    const struct arrays *a = &job->a;
    int me;
    int64_t lo, hi, from, to, offset = 0, unmerged = 0;
    share(job->parallel, a->total, &me, &lo, &hi);
    uint32_t *counts = job->counts + (size_t)me * LOW_BUCKETS;
    for (Py_ssize_t t = 0; t < a->count && offset < hi; offset += a->sizes[t], t++) {
        if (!segment(a, t, offset, lo, hi, &from, &to))
            continue;
        for (int64_t i = from; i < to;) { /* pieces short enough for the uint32 counts */
            int64_t n = to - i < MERGE_EVERY - unmerged ? to - i : MERGE_EVERY - unmerged;
#ifdef GSM_X86
            if (use_avx2)
                bucket_lows_avx2(a->w[t] + i, a->g[t] + i, n, job->high, counts);
            else
#endif
                bucket_lows_portable(a->w[t] + i, a->g[t] + i, n, job->high, counts);
            i += n;
            unmerged += n;
            if (unmerged == MERGE_EVERY) {
                merge_counts(counts, LOW_BUCKETS, job->histogram);
                unmerged = 0;
            }
        }
    }
    merge_counts(counts, LOW_BUCKETS, job->histogram);
}

/* Counts the metrics of the arrays whose high 16 bits are `high` by their low 16 bits into `histogram`
   (LOW_BUCKETS, overwritten): with the candidates' histogram of the high bits, this finds the k-th largest
   metric exactly without storing the metrics. Returns how many there are, or -1 when the threads' counts
   cannot be allocated. */
static int64_t count_bucket_lows(struct arrays a, uint32_t high, int64_t *histogram, long threads)
{
    struct bucket_lows_job job;
    job.a = a;
    job.high = high;
    job.histogram = histogram;
    int count = thread_count(a.total, threads);
    job.counts = PyMem_RawCalloc((size_t)count * LOW_BUCKETS, sizeof(uint32_t));
    if (job.counts == NULL)
        return -1;
    memset(histogram, 0, LOW_BUCKETS * sizeof(int64_t));
    run(bucket_lows_share, &job, &job.parallel, count);
    PyMem_RawFree(job.counts);
    int64_t found = 0;
    for (int b = 0; b < LOW_BUCKETS; b++)
        found += histogram[b];
    return found;
}

/* ---- kth_largest ------------------------------------------------------------------------------------- */

/* The k-th largest of `count` non-negative floats or NaNs (without sign bit), 1 <= k <= count, by a radix
   select on their bit patterns, which such floats order as integers, every NaN above +inf: the 11 high bits,
   then the next 11, then the last 9 (the sign bit is 0), each round counting the candidates that share the
   bits chosen so far and keeping, at the front of `values`, those of the bucket the k-th lies in. Exact and
   O(count); reorders `values`. */
static float select_kth_largest(float *values, int64_t count, int64_t k)
{
    static const int shifts[3] = {20, 9, 0}, widths[3] = {11, 11, 9};
    uint32_t prefix = 0;
    for (int round = 0; round < 3; round++) {
        int shift = shifts[round], buckets = 1 << widths[round];
        int64_t histogram[2048] = {0};
        for (int64_t i = 0; i < count; i++) {
            uint32_t bits;
            memcpy(&bits, &values[i], sizeof bits);
            histogram[(bits >> shift) & (uint32_t)(buckets - 1)]++;
        }
        int bucket = buckets - 1;
        for (; bucket > 0 && histogram[bucket] < k; bucket--)
            k -= histogram[bucket]; /* the k-th largest lies below this bucket */
        prefix |= (uint32_t)bucket << shift;
        int64_t kept = 0;
        for (int64_t i = 0; i < count; i++) {
            uint32_t bits;
            memcpy(&bits, &values[i], sizeof bits);
            if (((bits >> shift) & (uint32_t)(buckets - 1)) == (uint32_t)bucket)
                values[kept++] = values[i];
        }
        count = kept;
    }
    float tau;
    memcpy(&tau, &prefix, sizeof tau);
    return tau;
}

/* Moves the values whose high 16 bits are `high` to the front of `values`, in order; returns their count. */
static int64_t keep_bucket_portable(float *values, int64_t count, uint32_t high)
{
    int64_t kept = 0;
    for (int64_t i = 0; i < count; i++) {
        uint32_t bits;
        memcpy(&bits, &values[i], sizeof bits);
        values[kept] = values[i]; /* kept only when it matches, as in candidates_portable */
        kept += bits >> 16 == high;
    }
    return kept;
}

#ifdef GSM_X86
/* The 8 values a block holds are loaded before any store, and a store at `kept` <= i ends before the next
   block, so the left pack works in place. */
__attribute__((target("avx2,popcnt")))
static int64_t keep_bucket_avx2(float *values, int64_t count, uint32_t high)
{
    const __m256i wanted = _mm256_set1_epi32((int)high);
    int64_t kept = 0, i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 v = _mm256_loadu_ps(values + i);
        int mask = _mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(_mm256_castps_si256(v), 16), wanted)));
        if (mask) {
            __m256i order = _mm256_loadu_si256((const __m256i *)pack_order[mask]);
            _mm256_storeu_ps(values + kept, _mm256_permutevar8x32_ps(v, order));
            kept += __builtin_popcount(mask);
        }
    }
    int64_t rest = keep_bucket_portable(values + i, count - i, high);
    memmove(values + kept, values + i, (size_t)rest * sizeof(float));
    return kept + rest;
}
#endif

struct keep_job {
    float *values;
    int64_t count;
    uint32_t high;
    int parallel;
    int64_t start[MAX_THREADS], kept[MAX_THREADS];
};

/* Each thread moves the values of the bucket in its share to the front of the share. */
static void keep_share(void *data)
{
    struct keep_job *job = data;
    int me;
    int64_t lo, hi;
    share(job->parallel, job->count, &me, &lo, &hi);
#ifdef GSM_X86
    if (use_avx2)
        job->kept[me] = keep_bucket_avx2(job->values + lo, hi - lo, job->high);
    else
#endif
        job->kept[me] = keep_bucket_portable(job->values + lo, hi - lo, job->high);
    job->start[me] = lo;
}

/* The rank-th largest (1-based) of the values whose high 16 bits are `high`, into *tau: the values of one
   bucket of the candidates' histogram, a few among them, are moved to the front (the shares of the threads
   first to the fronts of the shares, then together) and radix-selected. -1 when fewer than `rank` values are
   in the bucket. Reorders `values`. */
static int select_in_bucket(float *values, int64_t count, uint32_t high, int64_t rank, long threads, float *tau)
{
    struct keep_job job;
    job.values = values;
    job.count = count;
    job.high = high;
    int shares = thread_count(count, threads);
    for (int i = 0; i < shares; i++)
        job.start[i] = 0, job.kept[i] = 0;
    run(keep_share, &job, &job.parallel, shares);
    int64_t kept = 0;
    for (int i = 0; i < shares; i++) {
        if (job.kept[i] && job.start[i] != kept)
            memmove(values + kept, values + job.start[i], (size_t)job.kept[i] * sizeof(float));
        kept += job.kept[i];
    }
    if (kept < rank)
        return -1;
    *tau = select_kth_largest(values, kept, rank);
    return 0;
}

/* ---- update ------------------------------------------------------------------------------------------ */

/* An element takes its loss gradient when its metric is >= tau or NaN: with tau = -inf every element does,
   with tau NaN only the NaN ones (a NaN ranks above every number). The conditions on b, weight_decay and
   nesterov do not change within the loop: the compiler makes one loop of each case (loop unswitching, at
   -O3) and vectorises it. */
static ALWAYS_INLINE int64_t update_portable(float *w, const float *g, float *b, int64_t n, float tau, float lr,
                                             float momentum, float weight_decay, int nesterov)
{
    int64_t active = 0;
    for (int64_t i = 0; i < n; i++) {
        float wi = w[i], gi = g[i];
        float m = fabsf(wi * gi);
        int on = (m >= tau) | (m != m);
        active += on;
        float d = on ? gi : 0.0f;
        if (weight_decay != 0.0f) /* as SGD, which adds no decay term at 0 (0 * inf would make a NaN) */
            d += weight_decay * wi;
        if (b == NULL) { /* no momentum */
            w[i] = wi - lr * d;
            continue;
        }
        float bi = momentum * b[i] + d;
        b[i] = bi;
        w[i] = nesterov ? wi - lr * (d + momentum * bi) : wi - lr * bi;
    }
    return active;
}

#ifdef GSM_X86
__attribute__((target("avx2")))
static int64_t update_avx2(float *w, const float *g, float *b, int64_t n, float tau, float lr, float momentum,
                           float weight_decay, int nesterov)
{
    return update_portable(w, g, b, n, tau, lr, momentum, weight_decay, nesterov);
}
#endif

static int64_t update_default(float *w, const float *g, float *b, int64_t n, float tau, float lr, float momentum,
                              float weight_decay, int nesterov)
{
    return update_portable(w, g, b, n, tau, lr, momentum, weight_decay, nesterov);
}

/* Per array: its threshold and hyperparameters (one call updates the arrays of every param group). */
struct update_settings {
    float tau, lr, momentum, weight_decay;
    int nesterov;
};

struct update_job {
    struct arrays a;
    const struct update_settings *settings;
    int parallel;
    int64_t *active;
};

static void update_share(void *data)
{
    struct update_job *job = data;
    const struct arrays *a = &job->a;
    int me;
    int64_t lo, hi, from, to, offset = 0;
    share(job->parallel, a->total, &me, &lo, &hi);
    for (Py_ssize_t t = 0; t < a->count && offset < hi; offset += a->sizes[t], t++) {
        if (!segment(a, t, offset, lo, hi, &from, &to))
            continue;
        const struct update_settings *s = &job->settings[t];
        float *b = a->b[t] == NULL ? NULL : a->b[t] + from;
        int64_t active;
#ifdef GSM_X86
        if (use_avx2)
            active = update_avx2(a->w[t] + from, a->g[t] + from, b, to - from, s->tau, s->lr, s->momentum,
                                 s->weight_decay, s->nesterov);
        else
#endif
            active = update_default(a->w[t] + from, a->g[t] + from, b, to - from, s->tau, s->lr, s->momentum,
                                    s->weight_decay, s->nesterov);
        __atomic_fetch_add(&job->active[t], active, __ATOMIC_RELAXED);
    }
}

/* ---- the Python interface ---------------------------------------------------------------------------- */

/* Memory for the per-array arguments of one call, freed by release_arrays. */
struct call {
    Py_ssize_t count;
    float **w;
    float **g;
    float **b;
    int64_t *sizes;
    struct update_settings *settings;
    int64_t *active;
};

static void release_call(struct call *c)
{
    PyMem_Free(c->w);
    PyMem_Free(c->g);
    PyMem_Free(c->b);
    PyMem_Free(c->sizes);
    PyMem_Free(c->settings);
    PyMem_Free(c->active);
    memset(c, 0, sizeof *c);
}

/* The length of `seq` (a list or tuple), or -1 with TypeError. */
static Py_ssize_t sequence_length(PyObject *seq, const char *what)
{
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list or tuple, not %.100s", what, Py_TYPE(seq)->tp_name);
        return -1;
    }
    return PySequence_Fast_GET_SIZE(seq);
}

/* Reads `count` addresses (ints; None gives NULL where `none_ok`) from `seq` into `out`; each must be 4-byte
   aligned. */
static int read_addresses(PyObject *seq, Py_ssize_t count, float **out, const char *what, int none_ok)
{
    if (sequence_length(seq, what) != count) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s: expected %zd addresses", what, count);
        return -1;
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, t);
        if (item == Py_None && none_ok) {
            out[t] = NULL;
            continue;
        }
        if (!PyLong_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be an address (int)", what, t);
            return -1;
        }
        void *address = PyLong_AsVoidPtr(item);
        if (address == NULL && PyErr_Occurred())
            return -1;
        if ((uintptr_t)address % sizeof(float) != 0) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] is not aligned for float32", what, t);
            return -1;
        }
        out[t] = address;
    }
    return 0;
}

/* Reads `count` element counts (non-negative ints whose sum fits int64) into c->sizes; returns their sum or
   -1. Every array of non-zero size must have an address. */
static int64_t read_sizes(PyObject *seq, struct call *c)
{
    if (sequence_length(seq, "sizes") != c->count) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "sizes: expected %zd sizes", c->count);
        return -1;
    }
    int64_t total = 0;
    for (Py_ssize_t t = 0; t < c->count; t++) {
        long long size = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, t));
        if (size == -1 && PyErr_Occurred())
            return -1;
        if (size < 0 || size > (INT64_MAX - 8) / (int64_t)sizeof(float) - total) {
            PyErr_Format(PyExc_ValueError, "sizes[%zd] = %lld is negative or too large", t, size);
            return -1;
        }
        if (size > 0 && (c->w[t] == NULL || c->g[t] == NULL)) {
            PyErr_Format(PyExc_ValueError, "array %zd has %lld elements and a null address", t, size);
            return -1;
        }
        c->sizes[t] = size;
        total += size;
    }
    return total;
}

/* A memory range a call touches: [start, end), whether the kernel writes it, and what it is (for messages). */
struct range {
    uintptr_t start, end;
    int writes;
    const char *role;
    Py_ssize_t index;
};

static int range_order(const void *a, const void *b)
{
    uintptr_t x = ((const struct range *)a)->start, y = ((const struct range *)b)->start;
    return (x > y) - (x < y);
}

/* ValueError when a range that the kernel writes overlaps any other range: a sweep in address order, keeping
   the range that reaches furthest (a writer overlapping an earlier range is caught when it comes, a range
   overlapping an earlier writer is caught unless a longer range came between, which the writer overlaps too). */
static int refuse_overlaps(struct range *ranges, Py_ssize_t count)
{
    qsort(ranges, (size_t)count, sizeof *ranges, range_order);
    const struct range *furthest = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        const struct range *r = &ranges[i];
        if (r->start == r->end)
            continue;
        if (furthest != NULL && r->start < furthest->end && (r->writes || furthest->writes)) {
            PyErr_Format(PyExc_ValueError,
                         "%s %zd and %s %zd overlap in memory; every parameter, gradient and momentum buffer of a "
                         "step must have memory of its own",
                         furthest->role, furthest->index, r->role, r->index);
            return -1;
        }
        if (furthest == NULL || r->end > furthest->end)
            furthest = r;
    }
    return 0;
}

/* The ranges of the arrays of a call (weights and buffers written when `writes`, gradients read), plus the
`count` buffers `outs` (written, named by `roles`); ValueError when they overlap as refuse_overlaps says. */
static int check_ranges(const struct call *c, int writes, const Py_buffer *outs, const char *const *roles,
                        Py_ssize_t count)
{
    Py_ssize_t n = 0;
    struct range *ranges = PyMem_Calloc((size_t)(3 * c->count + count + 1), sizeof *ranges);
    if (ranges == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t t = 0; t < c->count; t++) {
        uintptr_t bytes = (uintptr_t)c->sizes[t] * sizeof(float);
        ranges[n++] = (struct range){(uintptr_t)c->w[t], (uintptr_t)c->w[t] + bytes, writes, "parameter", t};
        ranges[n++] = (struct range){(uintptr_t)c->g[t], (uintptr_t)c->g[t] + bytes, 0, "gradient", t};
        if (c->b[t] != NULL)
            ranges[n++] = (struct range){(uintptr_t)c->b[t], (uintptr_t)c->b[t] + bytes, 1, "momentum buffer", t};
    }
    for (Py_ssize_t i = 0; i < count; i++)
        ranges[n++] = (struct range){(uintptr_t)outs[i].buf, (uintptr_t)outs[i].buf + (uintptr_t)outs[i].len, 1,
                                     roles[i], 0};
    int status = refuse_overlaps(ranges, n);
    PyMem_Free(ranges);
    return status;
}

/* Allocates the per-array memory of a call over `count` arrays. */
static int allocate_call(struct call *c, Py_ssize_t count)
{
    memset(c, 0, sizeof *c);
    c->count = count;
    size_t n = count > 0 ? (size_t)count : 1;
    c->w = PyMem_Calloc(n, sizeof(float *));
    c->g = PyMem_Calloc(n, sizeof(float *));
    c->b = PyMem_Calloc(n, sizeof(float *));
    c->sizes = PyMem_Calloc(n, sizeof(int64_t));
    c->settings = PyMem_Calloc(n, sizeof(struct update_settings));
    c->active = PyMem_Calloc(n, sizeof(int64_t));
    if (!c->w || !c->g || !c->b || !c->sizes || !c->settings || !c->active) {
        release_call(c);
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* The arrays of a call from its `weights`, `grads` and `sizes` arguments into `c` (allocated here; released
   by release_call, also on failure); their total element count, or -1 with an exception set. */
static int64_t read_arrays(PyObject *weights, PyObject *grads, PyObject *sizes, struct call *c)
{
    memset(c, 0, sizeof *c);
    Py_ssize_t count = sequence_length(weights, "weights");
    if (count < 0 || allocate_call(c, count) < 0)
        return -1;
    if (read_addresses(weights, count, c->w, "weights", 0) < 0 || read_addresses(grads, count, c->g, "grads", 0) < 0)
        return -1;
    return read_sizes(sizes, c);
}

/* A writable, C-contiguous buffer of float32 ('f') items, or -1 with TypeError. */
static int float_buffer(PyObject *object, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(object, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != sizeof(float) || view->format == NULL || strcmp(view->format, "f") != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a writable contiguous float32 array", what);
        return -1;
    }
    return 0;
}

/* The float32 buffer `values` (as `float_buffer`) of a selection among its first `count` elements of the
   `k`-th largest (`k_name`: what the caller calls k), or -1 with TypeError or ValueError unless
   1 <= k <= count <= its size. */
static int selection_buffer(PyObject *values, Py_buffer *view, long long count, long long k, const char *k_name)
{
    if (float_buffer(values, view, "values") < 0)
        return -1;
    Py_ssize_t room = view->len / (Py_ssize_t)sizeof(float);
    if (k < 1 || count < k || count > room) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "need 1 <= %s <= count <= %zd, got %s=%lld, count=%lld", k_name, room,
                     k_name, k, count);
        return -1;
    }
    return 0;
}

/* A writable, C-contiguous buffer of exactly `count` int64 items ('q', or 'l' where long is 64 bits), or -1 with
   TypeError (another type) or ValueError (another size). */
static int counts_buffer(PyObject *object, Py_buffer *view, Py_ssize_t count, const char *what)
{
    if (PyObject_GetBuffer(object, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format;
    if (view->itemsize != sizeof(int64_t) || format == NULL || (strcmp(format, "q") != 0 && strcmp(format, "l") != 0)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a writable contiguous int64 array", what);
        return -1;
    }
    if (view->len != count * (Py_ssize_t)sizeof(int64_t)) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s must hold exactly %zd int64 counts", what, count);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(candidates_doc,
"candidates(weights, grads, sizes, bound, out, histogram, threads) -> int\n\n"
"Counts |w * g| of every element of the arrays at the addresses `weights` and `grads` (float32, `sizes`\n"
"elements each) that is >= `bound` or NaN, writes the first of them to the writable float32 buffer `out`, as\n"
"many as it holds (its capacity), in no fixed order, counts them all by the high 16 bits of their bit patterns\n"
"into `histogram` (a writable int64 buffer of exactly 32768 counts, overwritten; None: no counts), and returns\n"
"their exact number, which may be above the capacity.");

static PyObject *py_candidates(PyObject *module, PyObject *args)
{
    PyObject *weights, *grads, *sizes, *out, *histogram;
    float bound;
    long threads;
    if (!PyArg_ParseTuple(args, "OOOfOOl:candidates", &weights, &grads, &sizes, &bound, &out, &histogram, &threads))
        return NULL;
    struct call c;
    int64_t total = read_arrays(weights, grads, sizes, &c);
    if (total < 0) {
        release_call(&c);
        return NULL;
    }
    Py_ssize_t count = c.count;
    Py_buffer views[2];
    if (float_buffer(out, &views[0], "out") < 0) {
        release_call(&c);
        return NULL;
    }
    int counted = histogram != Py_None;
    if (counted && counts_buffer(histogram, &views[1], HIGH_BUCKETS, "histogram") < 0) {
        PyBuffer_Release(&views[0]);
        release_call(&c);
        return NULL;
    }
    static const char *const roles[2] = {"out", "histogram"};
    if (check_ranges(&c, 0, views, roles, 1 + counted) < 0) {
        PyBuffer_Release(&views[0]);
        if (counted)
            PyBuffer_Release(&views[1]);
        release_call(&c);
        return NULL;
    }
    struct arrays a = {count, c.w, (const float *const *)c.g, NULL, c.sizes, total};
    int64_t capacity = views[0].len / (Py_ssize_t)sizeof(float), found;
    int64_t *counts = counted ? views[1].buf : NULL;
    Py_BEGIN_ALLOW_THREADS
    found = collect_candidates(a, bound, views[0].buf, capacity, counts, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&views[0]);
    if (counted)
        PyBuffer_Release(&views[1]);
    release_call(&c);
    if (found < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(found);
}

PyDoc_STRVAR(bucket_lows_doc,
"bucket_lows(weights, grads, sizes, high, histogram, threads) -> int\n\n"
"Counts |w * g| of the elements of the arrays (as for `candidates`) whose bit patterns have the high 16 bits\n"
"`high` (0 <= high < 32768) by their low 16 bits into `histogram` (a writable int64 buffer of exactly 65536\n"
"counts, overwritten); returns how many there are. Stores no metric.");

static PyObject *py_bucket_lows(PyObject *module, PyObject *args)
{
    PyObject *weights, *grads, *sizes, *histogram;
    long long high;
    long threads;
    if (!PyArg_ParseTuple(args, "OOOLOl:bucket_lows", &weights, &grads, &sizes, &high, &histogram, &threads))
        return NULL;
    if (high < 0 || high >= HIGH_BUCKETS)
        return PyErr_Format(PyExc_ValueError, "need 0 <= high < %d, got %lld", HIGH_BUCKETS, high);
    struct call c;
    int64_t total = read_arrays(weights, grads, sizes, &c);
    if (total < 0) {
        release_call(&c);
        return NULL;
    }
    Py_buffer view;
    if (counts_buffer(histogram, &view, LOW_BUCKETS, "histogram") < 0) {
        release_call(&c);
        return NULL;
    }
    static const char *const roles[1] = {"histogram"};
    if (check_ranges(&c, 0, &view, roles, 1) < 0) {
        PyBuffer_Release(&view);
        release_call(&c);
        return NULL;
    }
    struct arrays a = {c.count, c.w, (const float *const *)c.g, NULL, c.sizes, total};
    int64_t found;
    Py_BEGIN_ALLOW_THREADS
    found = count_bucket_lows(a, (uint32_t)high, view.buf, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    release_call(&c);
    if (found < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(found);
}

PyDoc_STRVAR(kth_in_bucket_doc,
"kth_in_bucket(values, count, high, rank, threads) -> float\n\n"
"The rank-th largest (1-based) of those of the first `count` elements of the writable float32 buffer `values`\n"
"whose bit patterns have the high 16 bits `high` (0 <= high < 32768): non-negative numbers or NaNs, as\n"
"`candidates` writes them, ranked by bit pattern (every NaN above +inf). ValueError when fewer than `rank`\n"
"have them. Reorders the values.");

static PyObject *py_kth_in_bucket(PyObject *module, PyObject *args)
{
    PyObject *values;
    long long count, high, rank;
    long threads;
    if (!PyArg_ParseTuple(args, "OLLLl:kth_in_bucket", &values, &count, &high, &rank, &threads))
        return NULL;
    if (high < 0 || high >= HIGH_BUCKETS)
        return PyErr_Format(PyExc_ValueError, "need 0 <= high < %d, got %lld", HIGH_BUCKETS, high);
    Py_buffer view;
    if (selection_buffer(values, &view, count, rank, "rank") < 0)
        return NULL;
    float tau;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = select_in_bucket(view.buf, count, (uint32_t)high, rank, threads, &tau);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (status < 0)
        return PyErr_Format(PyExc_ValueError, "fewer than %lld values in bucket %lld", rank, high);
    return PyFloat_FromDouble((double)tau);
}

PyDoc_STRVAR(kth_largest_doc,
"kth_largest(values, count, k) -> float\n\n"
"The k-th largest of the first `count` elements of the writable float32 buffer `values` (1 <= k <= count),\n"
"which must be non-negative numbers or NaNs, as `candidates` writes them (a NaN ranks above every number);\n"
"reorders them. Exact, in a few passes over them.");

static PyObject *py_kth_largest(PyObject *module, PyObject *args)
{
    PyObject *values;
    long long count, k;
    if (!PyArg_ParseTuple(args, "OLL:kth_largest", &values, &count, &k))
        return NULL;
    Py_buffer view;
    if (selection_buffer(values, &view, count, k, "k") < 0)
        return NULL;
    float tau;
    Py_BEGIN_ALLOW_THREADS
    tau = select_kth_largest(view.buf, count, k);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyFloat_FromDouble((double)tau);
}

/* Reads one float per array from `seq` into the field at `offset` of each of c->settings. */
static int read_setting(PyObject *seq, struct call *c, size_t offset, const char *what)
{
    if (sequence_length(seq, what) != c->count) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s: expected %zd values", what, c->count);
        return -1;
    }
    for (Py_ssize_t t = 0; t < c->count; t++) {
        double value = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, t));
        if (value == -1.0 && PyErr_Occurred())
            return -1;
        *(float *)((char *)&c->settings[t] + offset) = (float)value;
    }
    return 0;
}

PyDoc_STRVAR(update_doc,
"update(weights, grads, buffers, sizes, thresholds, lrs, momentums, weight_decays, nesterovs, threads)\n"
"    -> list of int\n\n"
"One momentum-SGD step of the float32 arrays at the addresses `weights` (`sizes` elements each), in place,\n"
"with gradients `grads` and momentum buffers `buffers` (an address, or None for no momentum), each array t\n"
"with its own threshold, lr, momentum, weight decay and Nesterov flag. An element takes its loss gradient\n"
"when |w * g| >= thresholds[t] or is NaN (-inf: every element); every element decays. Returns, per array,\n"
"the number of elements that took their gradient.");

static PyObject *py_update(PyObject *module, PyObject *args)
{
    PyObject *weights, *grads, *buffers, *sizes, *thresholds, *lrs, *momentums, *decays, *nesterovs;
    long threads;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOl:update", &weights, &grads, &buffers, &sizes, &thresholds, &lrs,
                          &momentums, &decays, &nesterovs, &threads))
        return NULL;
    struct call c;
    int64_t total = read_arrays(weights, grads, sizes, &c);
    Py_ssize_t count = c.count;
    if (total < 0 || read_addresses(buffers, count, c.b, "buffers", 1) < 0 ||
        read_setting(thresholds, &c, offsetof(struct update_settings, tau), "thresholds") < 0 ||
        read_setting(lrs, &c, offsetof(struct update_settings, lr), "lrs") < 0 ||
        read_setting(momentums, &c, offsetof(struct update_settings, momentum), "momentums") < 0 ||
        read_setting(decays, &c, offsetof(struct update_settings, weight_decay), "weight_decays") < 0 ||
        sequence_length(nesterovs, "nesterovs") < 0) {
        release_call(&c);
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(nesterovs) != count) {
        release_call(&c);
        return PyErr_Format(PyExc_ValueError, "nesterovs: expected %zd flags", count);
    }
    for (Py_ssize_t t = 0; t < count; t++) {
        int flag = PyObject_IsTrue(PySequence_Fast_GET_ITEM(nesterovs, t));
        if (flag < 0) {
            release_call(&c);
            return NULL;
        }
        c.settings[t].nesterov = flag;
    }
    if (check_ranges(&c, 1, NULL, NULL, 0) < 0) {
        release_call(&c);
        return NULL;
    }
    struct update_job job = {{count, c.w, (const float *const *)c.g, c.b, c.sizes, total}, c.settings, 0, c.active};
    Py_BEGIN_ALLOW_THREADS
    run(update_share, &job, &job.parallel, thread_count(total, threads));
    Py_END_ALLOW_THREADS
    PyObject *active = PyList_New(count);
    for (Py_ssize_t t = 0; active != NULL && t < count; t++) {
        PyObject *number = PyLong_FromLongLong(c.active[t]);
        if (number == NULL)
            Py_CLEAR(active);
        else
            PyList_SET_ITEM(active, t, number);
    }
    release_call(&c);
    return active;
}

PyDoc_STRVAR(use_openmp_doc,
"use_openmp(path) -> bool\n\n"
"Run the kernels on the thread pool of the OpenMP runtime at `path`, which must already be loaded in the\n"
"process (the one torch computes with); None, or a runtime without GOMP_parallel, omp_get_thread_num and\n"
"omp_get_num_threads: on the calling thread. Returns whether they run on the pool.");

static PyObject *py_use_openmp(PyObject *module, PyObject *path)
{
    gomp_parallel = NULL;
    if (path == Py_None)
        Py_RETURN_FALSE;
    if (!PyUnicode_Check(path))
        return PyErr_Format(PyExc_TypeError, "path must be a str or None");
    const char *name = PyUnicode_AsUTF8(path);
    if (name == NULL)
        return NULL;
    void *runtime = dlopen(name, RTLD_NOW | RTLD_NOLOAD); /* only a library already loaded */
    if (runtime == NULL)
        Py_RETURN_FALSE;
    gomp_parallel_fn parallel = (gomp_parallel_fn)dlsym(runtime, "GOMP_parallel");
    omp_int_fn thread_num = (omp_int_fn)dlsym(runtime, "omp_get_thread_num");
    omp_int_fn num_threads = (omp_int_fn)dlsym(runtime, "omp_get_num_threads");
    if (parallel == NULL || thread_num == NULL || num_threads == NULL) {
        dlclose(runtime);
        Py_RETURN_FALSE;
    }
    /* The handle stays open: it keeps the runtime loaded for as long as the kernels use it. */
    omp_thread_num = thread_num;
    omp_num_threads = num_threads;
    gomp_parallel = parallel;
    Py_RETURN_TRUE;
}

static PyObject *py_last_threads(PyObject *module, PyObject *unused)
{
    return PyLong_FromLong(last_threads);
}

static PyObject *py_uses_avx2(PyObject *module, PyObject *unused)
{
#ifdef GSM_X86
    return PyBool_FromLong(use_avx2);
#else
    Py_RETURN_FALSE;
#endif
}

#ifdef GSM_X86
static int has_avx2 = 0;
#endif

static PyObject *py_set_avx2(PyObject *module, PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0)
        return NULL;
#ifdef GSM_X86
    use_avx2 = on && has_avx2;
    return PyBool_FromLong(use_avx2);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"candidates", py_candidates, METH_VARARGS, candidates_doc},
    {"kth_largest", py_kth_largest, METH_VARARGS, kth_largest_doc},
    {"kth_in_bucket", py_kth_in_bucket, METH_VARARGS, kth_in_bucket_doc},
    {"bucket_lows", py_bucket_lows, METH_VARARGS, bucket_lows_doc},
    {"update", py_update, METH_VARARGS, update_doc},
    {"use_openmp", py_use_openmp, METH_O, use_openmp_doc},
    {"last_threads", py_last_threads, METH_NOARGS, "The number of threads that ran the last kernel call."},
    {"uses_avx2", py_uses_avx2, METH_NOARGS, "Whether the kernels run their AVX2 versions."},
    {"set_avx2", py_set_avx2, METH_O,
     "Run the AVX2 versions (where the processor has AVX2) or the portable ones, to test both; returns uses_avx2()."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef host_kernels_module = {
    PyModuleDef_HEAD_INIT, "_host_kernels",
    "GSM's compiled host kernels (candidates, kth_in_bucket, bucket_lows, kth_largest, update); gsm.host_kernels\n"
    "checks their arguments.",
    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__host_kernels(void)
{
#ifdef GSM_X86
    fill_pack_order();
    has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    use_avx2 = has_avx2;
#endif
    return PyModule_Create(&host_kernels_module);
}
