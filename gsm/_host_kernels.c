/* GSM's two host kernels, for float32 arrays in host memory (loaded with ctypes by gsm/host_kernels.py).

   gsm_candidates: one pass over the weights and gradients that collects the metric |w * g| of the elements at
   or above a bound, from which the exact Q-th largest metric tau is found among a few candidates.
   gsm_update: one pass that applies the momentum-SGD update with the loss gradient only where |w * g| >= tau,
   in torch.optim.SGD's order of operations (d = mask * g + wd * w; b = momentum * b + d; w -= lr * b, or
   w -= lr * (d + momentum * b) with Nesterov), without building a mask or a masked gradient.

   Both split large work over the threads of torch's own OpenMP pool, through the runtime's GOMP_parallel
   entry point that gsm_use_openmp hands over (the pool whose threads torch's operators use, and which
   gsm.flush_denormals has set to flush subnormals to zero); without it they run on the calling thread. Every
   element's arithmetic is the same whatever the number of threads, and the candidates keep their order, so
   the results do not depend on it. Each kernel has an AVX2 version chosen at run time on x86-64; it performs
   the same IEEE operations as the portable version (no fused multiply-add), so the results do not depend on
   the processor either. The file is also an empty Python extension module, so that the package's build
   compiles it and the import system finds it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GSM_X86 1
#include <immintrin.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

/* ---- threads ----------------------------------------------------------------------------------------- */

typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static gomp_parallel_fn gomp_parallel = NULL;
static int (*omp_thread_num)(void) = NULL;
static int (*omp_num_threads)(void) = NULL;

#define MAX_THREADS 256
/* Below this many elements a kernel runs on one thread: a parallel region costs a few microseconds. */
#define MIN_PARALLEL_ELEMENTS 65536

/* Hands over the OpenMP runtime's GOMP_parallel, omp_get_thread_num and omp_get_num_threads (NULL: none). */
void gsm_use_openmp(void *parallel, void *thread_num, void *num_threads)
{
    if (parallel != NULL && thread_num != NULL && num_threads != NULL) {
        gomp_parallel = (gomp_parallel_fn)parallel;
        omp_thread_num = (int (*)(void))thread_num;
        omp_num_threads = (int (*)(void))num_threads;
    } else {
        gomp_parallel = NULL;
    }
}

/* The arrays of one call, viewed as one index space [0, total) of consecutive segments. */
struct arrays {
    int64_t count;
    float *const *w;
    const float *const *g;
    float *const *b;
    const int64_t *sizes;
    int64_t total;
};

#ifdef GSM_X86
/* Whether the AVX2 versions run: set by gsm_init on processors that have AVX2 (and POPCNT). */
static int use_avx2 = 0;
#endif

/* How many threads a kernel over `total` elements asks for, given torch's `threads`: in [1, MAX_THREADS]. */
static int thread_count(int64_t total, int threads)
{
    if (total < MIN_PARALLEL_ELEMENTS || threads < 1)
        return 1;
    return threads > MAX_THREADS ? MAX_THREADS : threads;
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

/* The number of threads that ran the last kernel (for tests). */
int gsm_last_threads(void)
{
    return last_threads;
}

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
static int segment(const struct arrays *a, int64_t t, int64_t offset, int64_t lo, int64_t hi, int64_t *from,
                   int64_t *to)
{
    *from = lo > offset ? lo - offset : 0;
    *to = hi - offset < a->sizes[t] ? hi - offset : a->sizes[t];
    return *from < *to;
}

/* ---- gsm_candidates ---------------------------------------------------------------------------------- */

static ALWAYS_INLINE int64_t candidates_portable(const float *w, const float *g, int64_t n, float bound, float *out)
{
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        float m = fabsf(w[i] * g[i]);
        out[found] = m; /* kept only when it passes: the next write goes to the same place otherwise */
        found += m >= bound;
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

/* Writes at most 7 floats past the candidates found, never past out + n. */
__attribute__((target("avx2,popcnt")))
static int64_t candidates_avx2(const float *w, const float *g, int64_t n, float bound, float *out)
{
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 at_least = _mm256_set1_ps(bound);
    int64_t found = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 m = _mm256_and_ps(_mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(g + i)), magnitude);
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(m, at_least, _CMP_GE_OQ));
        if (mask) {
            __m256i order = _mm256_loadu_si256((const __m256i *)pack_order[mask]);
            _mm256_storeu_ps(out + found, _mm256_permutevar8x32_ps(m, order));
            found += __builtin_popcount(mask);
        }
    }
    return found + candidates_portable(w + i, g + i, n - i, bound, out + found);
}
#endif

struct candidates_job {
    struct arrays a;
    float bound;
    float *out;
    int parallel;
    int64_t start[MAX_THREADS], found[MAX_THREADS];
};

/* Each thread collects the candidates of its share into `out` from the share's first index on: a share of
   n elements has at most n candidates, so the shares' regions do not overlap. */
static void candidates_share(void *data)
{
    struct candidates_job *job = data;
    const struct arrays *a = &job->a;
    int me;
    int64_t lo, hi, from, to, found = 0, offset = 0;
    share(job->parallel, a->total, &me, &lo, &hi);
    for (int64_t t = 0; t < a->count && offset < hi; offset += a->sizes[t], t++) {
        if (!segment(a, t, offset, lo, hi, &from, &to))
            continue;
        float *out = job->out + lo + found;
#ifdef GSM_X86
        if (use_avx2) {
            found += candidates_avx2(a->w[t] + from, a->g[t] + from, to - from, job->bound, out);
            continue;
        }
#endif
        found += candidates_portable(a->w[t] + from, a->g[t] + from, to - from, job->bound, out);
    }
    job->start[me] = lo;
    job->found[me] = found;
}

/* Writes |w * g| of every element of the `count` arrays w[t], g[t] (sizes[t] elements each) that is >= bound
   (NaN is not) to `out`, in order, and returns how many there are. `out` must have room for every element
   plus 8. Runs on `threads` threads of the OpenMP pool when it is handed over and the arrays are large. */
int64_t gsm_candidates(int64_t count, const float *const *w, const float *const *g, const int64_t *sizes,
                       float bound, float *out, int threads)
{
    struct candidates_job job;
    job.a = (struct arrays){count, (float *const *)w, g, NULL, sizes, 0};
    for (int64_t t = 0; t < count; t++)
        job.a.total += sizes[t];
    job.bound = bound;
    job.out = out;
    threads = thread_count(job.a.total, threads);
    for (int i = 0; i < threads; i++)
        job.found[i] = 0, job.start[i] = 0;
    run(candidates_share, &job, &job.parallel, threads);
    int64_t found = job.parallel ? 0 : job.found[0];
    if (job.parallel) /* close the gaps between the shares' regions, in order */
        for (int i = 0; i < threads; i++) {
            if (job.found[i] && job.start[i] != found)
                memmove(out + found, out + job.start[i], (size_t)job.found[i] * sizeof(float));
            found += job.found[i];
        }
    return found;
}

/* ---- gsm_kth_largest --------------------------------------------------------------------------------- */

/* The k-th largest of `count` non-negative floats (no NaN), 1 <= k <= count, by a radix select on their bit
   patterns (which non-negative floats order as integers): the 11 high bits, then the next 11, then the last 9
   (the sign bit is 0), each round counting the candidates that share the bits chosen so far and keeping, at the
   front of `values`, those of the bucket the k-th lies in. Exact and O(count); reorders `values`. */
float gsm_kth_largest(float *values, int64_t count, int64_t k)
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

/* ---- gsm_update -------------------------------------------------------------------------------------- */

/* The conditions on b and nesterov do not change within the loop: the compiler makes one loop of each case
   (loop unswitching, at -O3) and vectorises it. */
static ALWAYS_INLINE int64_t update_portable(float *w, const float *g, float *b, int64_t n, float tau, float lr,
                                             float momentum, float weight_decay, int nesterov)
{
    int64_t active = 0;
    int unmasked = isinf(tau) && tau < 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float wi = w[i], gi = g[i];
        int on = unmasked | (fabsf(wi * gi) >= tau);
        active += on;
        float d = (on ? gi : 0.0f) + weight_decay * wi;
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

struct update_job {
    struct arrays a;
    const float *thresholds;
    float lr, momentum, weight_decay;
    int nesterov, parallel;
    int64_t *active;
};

static void update_share(void *data)
{
    struct update_job *job = data;
    const struct arrays *a = &job->a;
    int me;
    int64_t lo, hi, from, to, offset = 0;
    share(job->parallel, a->total, &me, &lo, &hi);
    for (int64_t t = 0; t < a->count && offset < hi; offset += a->sizes[t], t++) {
        if (!segment(a, t, offset, lo, hi, &from, &to))
            continue;
        float *b = a->b == NULL ? NULL : a->b[t] + from;
        int64_t active;
#ifdef GSM_X86
        if (use_avx2)
            active = update_avx2(a->w[t] + from, a->g[t] + from, b, to - from, job->thresholds[t], job->lr,
                                 job->momentum, job->weight_decay, job->nesterov);
        else
#endif
            active = update_default(a->w[t] + from, a->g[t] + from, b, to - from, job->thresholds[t], job->lr,
                                    job->momentum, job->weight_decay, job->nesterov);
        __atomic_fetch_add(&job->active[t], active, __ATOMIC_RELAXED);
    }
}

/* One momentum-SGD step of the `count` arrays w[t] with gradients g[t] and momentum buffers b[t] (b == NULL:
   no momentum), sizes[t] elements each. Element i of array t takes its loss gradient when
   |w[i] * g[i]| >= thresholds[t] (a threshold of -infinity passes every element, NaN included); every element
   decays. Writes the number of elements that took their gradient to active[t]. Threads as gsm_candidates. */
void gsm_update(int64_t count, float *const *w, const float *const *g, float *const *b, const int64_t *sizes,
                const float *thresholds, float lr, float momentum, float weight_decay, int nesterov, int64_t *active,
                int threads)
{
    struct update_job job;
    job.a = (struct arrays){count, w, g, b, sizes, 0};
    for (int64_t t = 0; t < count; t++) {
        job.a.total += sizes[t];
        active[t] = 0;
    }
    job.thresholds = thresholds;
    job.lr = lr, job.momentum = momentum, job.weight_decay = weight_decay, job.nesterov = nesterov;
    job.active = active;
    run(update_share, &job, &job.parallel, thread_count(job.a.total, threads));
}

/* Prepares the kernels: the left-pack table and the choice of the AVX2 versions (before it, both kernels
   take their portable versions). */
void gsm_init(void)
{
#ifdef GSM_X86
    fill_pack_order();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
}

/* ---- the module -------------------------------------------------------------------------------------- */

static struct PyModuleDef host_kernels_module = {
    PyModuleDef_HEAD_INIT, "_host_kernels",
    "GSM's compiled host kernels; their functions are C functions, loaded by gsm.host_kernels with ctypes.",
    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__host_kernels(void)
{
    return PyModule_Create(&host_kernels_module);
}
