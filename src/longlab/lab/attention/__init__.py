"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import cosformer, full, linear, performer, sliding  # noqa: F401
