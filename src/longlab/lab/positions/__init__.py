"""The lab's position components, one per module; importing this package registers them all."""

from longlab.lab.positions import (  # noqa: F401
    alibi,
    cope,
    fire,
    kerple_log,
    kerple_power,
    learned,
    nope,
    randomized,
    rope,
    sandwich,
    sinusoidal,
    t5,
    xpos,
)
