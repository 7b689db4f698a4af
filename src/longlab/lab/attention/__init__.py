"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import full, landmark, linear, rmt, sliding  # noqa: F401
