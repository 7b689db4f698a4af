"""The lab's attention components, one per module; importing this package registers them all."""

from longlab.lab.attention import (  # noqa: F401
    cla,
    cosformer,
    differential,
    full,
    gqa,
    infini,
    landmark,
    linear,
    memorizing,
    mqa,
    performer,
    rmt,
    sliding,
)
