"""kvpool: disaggregated prefill/decode LLM serving with CacheGen-compressed KV transfer.

Subpackages (each a top-level folder of the repository):

- ``kvpool.kernels``  (``kernels/``)  the CacheGen codec: C++ core, CPU and CUDA paths.
- ``kvpool.sidecar``  (``sidecar/``)  vLLM KV connector, transfer sidecar, P/D router.
- ``kvpool.operator`` (``operator/``) the kopf operator for the ``KVCachePool`` resource.
"""

__version__ = "0.1.0"
