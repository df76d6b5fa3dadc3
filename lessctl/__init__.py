"""lessctl: an experiment harness for LESS (low-rank KV-cache state + sparse eviction policies)."""

__version__ = "0.1.0"
