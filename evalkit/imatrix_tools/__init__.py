"""Computing importance matrices the way llama-imatrix does (the file formats: :mod:`evalkit.imatrix`).

* :mod:`~evalkit.imatrix_tools.collector`: which weights and tokens count; Σx², counts and
  calls reduced on the fly (per expert for MoE weights).
* :mod:`~evalkit.imatrix_tools.compute`: :func:`compute_imatrix`, a corpus through the exact
  forward with the collector attached, and the perplexity llama-imatrix prints.
* :mod:`~evalkit.imatrix_tools.reference_numerics`: the reference's fp16 KV cache and float32
  RoPE angles, applied to a loaded model during the pass (so its file is reproduced).
* :mod:`~evalkit.imatrix_tools.run_cache`: an ``evalkit run`` variant's computed imatrix,
  cached under the run folder by fingerprint.
"""
from evalkit.imatrix_tools.collector import ImatrixCollector, counted_positions
from evalkit.imatrix_tools.compute import ImatrixResult, compute_imatrix

__all__ = ["ImatrixCollector", "ImatrixResult", "compute_imatrix", "counted_positions"]
