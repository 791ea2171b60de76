/* De-interleaving repacked ("_R4"/"_R8") tensors into their plain type's rows.
 *
 * evalkit/formats/repack.py derives, per repacked type, a list of "runs": each bit field of
 * a plain chunk comes from one source byte of the repacked block (src byte, shift, mask)
 * and lands at (dst byte within the R plain chunks, shift). This loop applies them to every
 * block of a tensor; the layouts themselves live in Python (repack_layouts.py). */
#include <stdlib.h>
#include <string.h>
#include "ek_common.h"

/* src: the groups of R rows as stored, group g at src + g * src_group_stride, its blocks
 * from src_offset on, one block of R * chunk_bytes per chunk. dst: plain rows of
 * row_stride bytes; chunk c of row k goes to dst_offset + c * chunk_bytes.
 * runs: nruns int32 quintuples (src byte, src shift, mask, dst byte in [0, R*chunk_bytes),
 * dst shift). Returns EK_OK, or an error for bad arguments or no memory. */
int ek_unrepack(const uint8_t *src, int64_t ngroups, int64_t nchunks, int64_t src_group_stride,
                int64_t src_offset, uint8_t *dst, int64_t rows, int64_t row_stride, int64_t dst_offset,
                int64_t chunk_bytes, const int32_t *runs, int64_t nruns) {
    if (!src || !dst || !runs || ngroups < 0 || nchunks < 0 || rows <= 0 || chunk_bytes <= 0 || nruns <= 0)
        return EK_ERR_BAD_ARGUMENT;
    int64_t *dst_at = (int64_t *)malloc((size_t)nruns * sizeof(int64_t));
    if (!dst_at) return EK_ERR_NO_MEMORY;
    for (int64_t r = 0; r < nruns; ++r) {
        const int32_t db = runs[5 * r + 3];
        if (db < 0 || db >= rows * chunk_bytes || runs[5 * r] < 0 || runs[5 * r] >= rows * chunk_bytes) {
            free(dst_at);
            return EK_ERR_BAD_ARGUMENT;
        }
        dst_at[r] = (db / chunk_bytes) * row_stride + db % chunk_bytes;   /* row k, byte within its chunk */
    }
    const int64_t block_bytes = rows * chunk_bytes;
    for (int64_t g = 0; g < ngroups; ++g) {
        const uint8_t *s = src + g * src_group_stride + src_offset;
        uint8_t *d = dst + g * rows * row_stride + dst_offset;
        for (int64_t c = 0; c < nchunks; ++c, s += block_bytes, d += chunk_bytes) {
            for (int64_t k = 0; k < rows; ++k) memset(d + k * row_stride, 0, (size_t)chunk_bytes);
            for (int64_t r = 0; r < nruns; ++r) {
                const int32_t *u = runs + 5 * r;
                d[dst_at[r]] |= (uint8_t)(((s[u[0]] >> u[1]) & u[2]) << u[4]);
            }
        }
    }
    free(dst_at);
    return EK_OK;
}
