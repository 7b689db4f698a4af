"""Cache policies, one per file; importing this package registers them under their spec names."""

from longlab.cache.policies import (  # noqa: F401  (imported to register the policies)
    adakv,
    full,
    h2o,
    knorm,
    pyramidkv,
    quantized,
    quest,
    random,
    snapkv,
    streaming,
    tova,
    window,
)
