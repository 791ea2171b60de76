"""`evalkit imatrix` throughput: tokens/s as a ratio to `evalkit perplexity`, same model, same process.

Both passes evaluate the same chunks with the same batch and thread count, alternating
(perplexity, imatrix, perplexity, imatrix, ...) so that load on a shared machine hits both
alike; the ratio of the medians is reported. Collecting Σx² must not dominate: the goal is
imatrix ≥ 0.8 × perplexity. (The imatrix pass does more work by definition: every layer at
every position and all logits, as llama-imatrix, where perplexity's last layer and output
projection cover only the scored half.)
Usage: python bench/imatrix.py [--model smollm2] [--chunks 4] [--threads 2] [--repeats 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics


def one_round(model: str, corpus: str, chunks: int, threads: int, batch: int) -> tuple[float, float]:
    """(perplexity tokens/s, imatrix tokens/s) over the same chunks."""
    from evalkit.evaluation.perplexity import perplexity
    from evalkit.imatrix_tools import compute_imatrix

    # both figures time the evaluation loop alone (model loading and tokenizing excluded)
    ppl = perplexity(model, corpus, 512, chunks, threads, progress=False, out=io.StringIO(), batch=batch)
    res = compute_imatrix(model, corpus, 512, chunks, threads, batch, progress=False, out=None)
    return ppl["tokens_per_s"], res.tokens_per_s


def main() -> None:
    """Run the rounds and print (and optionally save) the medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--corpus", default="wikitext-2-raw-test")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [one_round(a.model, a.corpus, a.chunks, a.threads, a.batch) for _ in range(a.repeats)]
    ppl_tps = statistics.median(r[0] for r in rows)
    im_tps = statistics.median(r[1] for r in rows)
    res = {"model": a.model, "chunks": a.chunks, "threads": a.threads, "batch": a.batch,
           "perplexity_tokens_per_s": ppl_tps, "imatrix_tokens_per_s": im_tps, "ratio": im_tps / ppl_tps,
           "rounds": rows}
    print(f"perplexity {ppl_tps:8.1f} tokens/s")
    print(f"imatrix    {im_tps:8.1f} tokens/s   ratio {im_tps / ppl_tps:.3f} (goal >= 0.8)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
