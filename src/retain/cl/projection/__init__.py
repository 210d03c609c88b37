"""Shared by `gem` and `agem`: episodic memories of earlier tasks and gradient projection.

Not a method (it registers nothing): `math.py` holds the projections as pure functions,
`memory.py` the per-task row samples and the seeded reference draws, `method.py` the `Seq`
subclass both methods build on (reference gradients and the callback that projects the step's
gradient before the optimizer step). See docs/methods/gem.md and docs/methods/agem.md.
"""
