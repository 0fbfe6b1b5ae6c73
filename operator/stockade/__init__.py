"""stockade: Kubernetes network policy enforced with eBPF, beside any CNI."""

__version__ = "0.1.0"
