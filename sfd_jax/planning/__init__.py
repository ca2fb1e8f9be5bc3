"""Ahead-of-time TPU plans: compile a config's programs for a TPU topology from any
machine (``--mode=plan``; ``planning.plan.make_plan``). Modules: ``tpu`` (topologies,
compile-only devices, libtpu), ``programs`` (the programs of a config with abstract
inputs), ``hlo`` (collectives, matmul FLOPs and shapes of a compiled program),
``flops`` (analytic FLOP counts), ``plan`` (compile, search, report).

Nothing here is imported by the other parts; importing this package imports no jax.
"""
