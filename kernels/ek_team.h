/* Internal: run independent work items on a thread team (see team.c). */
#ifndef EK_TEAM_H
#define EK_TEAM_H

#include <stdint.h>
#include "evalkit_kernels.h"

/* slot: 0 <= slot < nthreads, distinct for threads running concurrently (per-thread scratch). */
typedef void (*ek_item_fn)(void *ctx, int64_t item, int slot);

/* Run item(ctx, i, slot) for i in [0, n_items) on nthreads threads: the runner's team when
 * runner is not NULL, else the caller plus pthreads. Returns when all are done. */
void ek_run_items(ek_item_fn item, void *ctx, int64_t n_items, int nthreads, ek_team_runner runner);

#endif
