"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import (  # noqa: F401
    cla,
    cosformer,
    cumulative_average,
    differential,
    full,
    gqa,
    infini,
    landmark,
    linear,
    memorizing,
    moving_average,
    mqa,
    performer,
    rmt,
    segment,
    sliding,
    xl,
)
