"""Torch side: feature embeddings, towers, teachers, distillation losses, loaders, training.

No Spark import at module level anywhere in this package: it runs inside training
workers and inside the embedding job's Arrow UDFs.
"""
