"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import bigbird, blockwise, dilated, full, linear, longformer, longnet, sliding  # noqa: F401
