"""KLD of the loaded model against its base on the calibration chunks, from any layer on.

The base pass runs once: it keeps each chunk's base log-probabilities (what every variant
is scored against) and the residual stream entering the layers where groups start. A
group whose first tensor sits in layer *i* changes nothing before layer *i*, so its
measurement restarts from the base's hidden state there instead of from the tokens
(groups in the last band cost about a third of a full pass). The layers run exactly the
ops of :meth:`evalkit.model.Model.forward` in the same order and shapes, so a pass from a
cached state gives the same logits, bit for bit, as a full pass (tests/test_sensitivity.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from evalkit.evaluation.corpus_chunks import ChunkedCorpus

__all__ = ["Calibration", "Measurer", "load_calibration", "token_stats"]


@dataclass
class Calibration:
    """The calibration chunks and how many go through the model per call."""

    corpus: ChunkedCorpus
    per_call: int

    @property
    def calls(self) -> list[list[int]]:
        """Chunk indices of each forward call."""
        from evalkit.evaluation.loop import batched
        return batched(range(self.corpus.n_chunks), self.per_call)


def load_calibration(base_path, corpus: str, ctx: int, chunks: int, batch: int) -> Calibration:
    """The first ``chunks`` chunks of ``ctx`` tokens of ``corpus`` (a text file or a bundled
    name) as the base model's tokenizer cuts them (llama-perplexity's chunking)."""
    from evalkit.corpus import load_corpus_text
    from evalkit.evaluation.corpus_chunks import chunk_corpus, encode_corpus
    from evalkit.evaluation.loop import chunks_per_call
    from evalkit.run_config import CorpusSpec
    text, sha, desc = load_corpus_text(CorpusSpec(path=corpus))
    tok = encode_corpus(base_path, text)
    cc = chunk_corpus(tok, tok.stream, sha, desc, ctx, chunks)
    return Calibration(cc, chunks_per_call(batch, ctx))


def _forward_from(model, tokens: np.ndarray, start: int, state, logits_start: int, out, capture: dict):
    """Logits rows from ``logits_start`` on for the chunks ``tokens`` (B, C), running blocks
    ``start``.. from ``state`` (the residual stream entering block ``start``; ignored for 0).

    ``capture``: {layer: None} filled with a copy of the stream entering each listed layer
    (``n_layer``: the last block's output, before the final norm)."""
    import torch
    from evalkit.model import Workspace
    n_layer = len(model.blk)
    with torch.inference_mode():
        if start == 0:
            x = model.token_embd(torch.from_numpy(tokens.astype(np.int64)))
        else:
            x = state.clone()        # the blocks update the stream in place
        ws = Workspace()
        for i in range(start, n_layer):
            if i in capture:
                capture[i] = x.clone()
            x = model.blk[i](x, model.rope, ws, keep_from=logits_start if i == n_layer - 1 else 0)
        if n_layer in capture:
            capture[n_layer] = x.clone()
        x = model.output_norm(x)
        return model.output(x, out=out)


class Measurer:
    """Forward passes of a loaded model over the calibration chunks, scored against its base.

    Call :meth:`base_pass` first, with the model as loaded; then change weights (see
    :class:`evalkit.sensitivity.swap.WeightSwapper`) and :meth:`measure`.
    """

    def __init__(self, model, calib: Calibration):
        from evalkit.model import Workspace
        self.model, self.calib = model, calib
        self.buffer = Workspace()
        self.base = None                 # list of evalkit.evaluation.reference.BaseChunk, per chunk
        self.base_states: list[dict] = []  # per call: {layer: residual stream entering it}

    @property
    def n_layer(self) -> int:
        """Blocks of the model."""
        return len(self.model.blk)

    def _logits(self, call: list[int], start: int, state, capture: dict) -> np.ndarray:
        """(B, rows, V) scored logits of one call's chunks (in the reused buffer)."""
        cc = self.calib.corpus
        w = cc.window
        tokens = cc.chunks[np.asarray(call)]
        out = self.buffer("logits", len(call), w.n_ctx - w.first_row, self.model.config.n_vocab)
        z = _forward_from(self.model, tokens, start, state, w.first_row, out, capture)
        return w.scored_rows(z.numpy())

    def base_pass(self, capture_layers: Iterable[int] = ()) -> None:
        """Compute the base log-probabilities of every chunk and keep the hidden states
        entering ``capture_layers``."""
        from evalkit.evaluation.reference import base_from_logits
        cc = self.calib.corpus
        self.base, self.base_states = [], []
        layers = sorted({int(i) for i in capture_layers if 0 < int(i) <= self.n_layer})
        for call in self.calib.calls:
            cap = dict.fromkeys(layers)
            rows = self._logits(call, 0, None, cap)
            for j, k in enumerate(call):
                self.base.append(base_from_logits(rows[j], cc.targets(k), k, cc.window.first_row))
            self.base_states.append(cap)

    def measure(self, start: int = 0, states: list[dict] | None = None, capture: Iterable[int] = (),
                name: str = "variant"):
        """Per-token KLD statistics (one :class:`evalkit.metrics.KLDTokens` over all chunks) of the
        model as it is now, running from layer ``start`` on (from ``states``, default the
        base's); also returns the states entering the layers of ``capture``, per call."""
        from evalkit.evaluation.reference import score_variant
        from evalkit.metrics import KLDTokens
        if self.base is None:
            raise RuntimeError("Measurer.base_pass must run before measure")
        states = self.base_states if states is None else states
        cc = self.calib.corpus
        parts, captured = [], []
        layers = sorted({int(i) for i in capture if 0 < int(i) <= self.n_layer})
        for c, call in enumerate(self.calib.calls):
            state = None
            if start > 0:
                if start not in states[c]:
                    raise RuntimeError(f"no hidden state kept for layer {start}")
                state = states[c][start]
            cap = dict.fromkeys(layers)
            rows = self._logits(call, start, state, cap)
            for j, k in enumerate(call):
                parts.append(score_variant(name, self.base[k], rows[j], cc.targets(k), k, cc.window.first_row))
            captured.append(cap)
        return KLDTokens.concat(parts), captured


def token_stats(tokens) -> dict:
    """The table's statistics of per-token results: mean KLD ± error, median, 99th percentile,
    maximum, top-token agreement ±, RMS Δp, mean ln(PPL ratio) ±, token count."""
    from evalkit.metrics import kld_statistics
    s = kld_statistics(tokens, compat=False)
    return {"kld_mean": s["kld_mean"][0], "kld_err": s["kld_mean"][1], "kld_median": s["kld_median"],
            "kld_p99": s["kld_p99"], "kld_max": s["kld_max"], "same_top_p": s["same_top_p"][0],
            "same_top_err": s["same_top_p"][1], "dp_rms": s["dp_rms"][0], "ln_ppl_ratio": s["mean_ln_ppl_ratio"][0],
            "ln_ppl_ratio_err": s["mean_ln_ppl_ratio"][1], "n_tokens": int(s["n_tokens"])}
