"""Model parts every wing shares: the model families (``families``), the cross-attention K/V
weights and their deltas (``kv``), prompt encoding with injected token vectors (``text``), the
losses' formulas (``losses``), mixed precision (``precision``), samplers (``sampling``) and tiny
models built from configs for tests and demos (``tiny``). Imports nothing else of the package but
``errors``."""
