"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import cla, differential, full, gqa, linear, mqa, sliding  # noqa: F401  # noqa: F401
