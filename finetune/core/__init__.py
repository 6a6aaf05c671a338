"""Core: what every layer may use, with no training stack of its own: the run-dir protocol, processes, disk errors,
files named by URL, the MoE family registry and the built-in checkable task."""
