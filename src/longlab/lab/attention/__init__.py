"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import (  # noqa: F401
    cumulative_average,
    full,
    linear,
    moving_average,
    segment,
    sliding,
    xl,
)
