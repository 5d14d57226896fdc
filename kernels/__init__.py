"""trackfleet reconstruction kernels.

Every stage is a pure function ``stage(xp, inputs, config)`` over frozen structure-of-arrays
containers, written once against an array namespace ``xp`` (numpy on the CPU, CuPy on a GPU).
This package imports nothing else of trackfleet's.
"""
