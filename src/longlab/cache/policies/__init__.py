"""Cache policies, one per file; importing this package registers them under their spec names."""

from longlab.cache.policies import (  # noqa: F401  (imported to register the policies)
    adakv,
    duo,
    expected_attention,
    full,
    h2o,
    knorm,
    kvzip,
    pyramidkv,
    quantized,
    quest,
    random,
    razor,
    retrieval,
    snapkv,
    streaming,
    tova,
    window,
)
