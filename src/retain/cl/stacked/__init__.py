"""Stacked per-task LoRAs, shared by `olora` and `nlora` (a helper package: it registers no method).

Task t trains a new LoRA (A_t, B_t) on the same target modules; the LoRAs of tasks < t are frozen
and stay active, so every layer computes `W x + scale * sum_{i<=t} B_i A_i x` and inference needs no
task identity. `math.py` holds the regularisers as pure functions, `method.py` the `StackedLoRA`
base class that the two methods subclass with their own penalty.
"""
