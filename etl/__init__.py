"""Spark side: sources, synthetic data, feature building, privileged columns, Delta I/O."""
