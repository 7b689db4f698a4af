"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import full, infini, landmark, linear, memorizing, rmt, sliding  # noqa: F401
