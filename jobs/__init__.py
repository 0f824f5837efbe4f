"""Thin spark-submit entry points; the library (etl, rec_models) does the work."""
