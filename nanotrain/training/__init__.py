"""Training: the loop, its step, the optimizer and schedule, divergence, preemption (docs/02)."""
