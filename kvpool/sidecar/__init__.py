"""kvpool.sidecar: vLLM KV connector, KV transfer sidecar and prefill/decode router."""
