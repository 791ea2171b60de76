"""Perplexity and KL-divergence statistics compatible with ``llama-perplexity``.

See docs/perplexity-kld.md: :mod:`.perplexity` (chunking, per-token NLL,
running/final PPL), :mod:`.kld` (per-token KLD quantities and the final-block
statistics), :mod:`.logits_file` (the ``--kl-divergence-base`` file).
"""
from evalkit.metrics.kld import (
    DP_PERCENTILES,
    KLD_PERCENTILES,
    KLDAccumulator,
    KLDTokens,
    kld_statistics,
    kld_token_stats,
    median_f32,
    percentile_f32,
)
from evalkit.metrics.logits_file import (
    CLAMP_IK,
    CLAMP_MAINLINE,
    LogitsChunk,
    LogitsFile,
    LogitsFileError,
    LogitsFileWriter,
    check_logits_file,
    decode_records,
    encode_records,
    file_size,
    record_units,
)
from evalkit.metrics.perplexity import (
    PerplexityAccumulator,
    check_finite_logits,
    chunk_tokens,
    n_scored,
    row_max_lse,
    scored_positions,
    token_nll,
)

__all__ = [
    "CLAMP_IK", "CLAMP_MAINLINE", "DP_PERCENTILES", "KLD_PERCENTILES",
    "KLDAccumulator", "KLDTokens", "LogitsChunk", "LogitsFile", "LogitsFileError",
    "LogitsFileWriter",
    "PerplexityAccumulator", "check_finite_logits", "check_logits_file", "chunk_tokens",
    "decode_records", "encode_records", "file_size", "kld_statistics", "kld_token_stats",
    "median_f32", "n_scored", "percentile_f32", "record_units", "row_max_lse",
    "scored_positions", "token_nll",
]
