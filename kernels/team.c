/* Work-item driver that can run on the caller's thread team.
 *
 * evalkit's matmul and attention run next to torch, whose OpenMP threads keep
 * spinning for milliseconds after each parallel region. Threads of our own started
 * beside them share the cores with those spinners and run at about half speed. So a
 * caller may hand us a "team runner" with GOMP_parallel's signature (torch's own
 * OpenMP runtime, found by the Python side): the work items then run on torch's
 * already-spinning threads, which pick them up at once. Without a runner the items
 * run on the calling thread plus nthreads - 1 pthreads.
 *
 * Items are claimed from one atomic counter, so every item runs exactly once however
 * many threads the runner actually starts; items never share outputs, so the split
 * does not change any result. */
#include <pthread.h>
#include <stdatomic.h>
#include "ek_team.h"

typedef struct {
    ek_item_fn item;
    void *ctx;
    int64_t n_items;
    int nthreads;
    atomic_llong next;
    atomic_int slots;
} ek_items_job;

static void ek_items_body(void *arg) {
    ek_items_job *job = (ek_items_job *)arg;
    const int slot = atomic_fetch_add_explicit(&job->slots, 1, memory_order_relaxed);
    if (slot >= job->nthreads) return;   /* a runner that started more threads than asked */
    for (;;) {
        int64_t i = (int64_t)atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed);
        if (i >= job->n_items) return;
        job->item(job->ctx, i, slot);
    }
}

static void *ek_items_thread(void *arg) {
    ek_items_body(arg);
    return NULL;
}

void ek_run_items(ek_item_fn item, void *ctx, int64_t n_items, int nthreads, ek_team_runner runner) {
    ek_items_job job;
    job.item = item;
    job.ctx = ctx;
    job.n_items = n_items;
    atomic_init(&job.next, 0);
    atomic_init(&job.slots, 0);
    if (n_items <= 0) return;
    if (nthreads > n_items) nthreads = (int)n_items;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    job.nthreads = nthreads;
    if (nthreads <= 1) {
        ek_items_body(&job);
    } else if (runner) {
        runner(ek_items_body, &job, (unsigned)nthreads, 0);
    } else {
        pthread_t tids[64];
        int started = 0;
        for (int t = 1; t < nthreads; ++t)
            if (pthread_create(&tids[started], NULL, ek_items_thread, &job) == 0) ++started;
        ek_items_body(&job);
        for (int t = 0; t < started; ++t) pthread_join(tids[t], NULL);
    }
}
