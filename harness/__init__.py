"""harness: a distributed training harness on HF Accelerate that survives preemption."""

__version__ = "0.1.0"
