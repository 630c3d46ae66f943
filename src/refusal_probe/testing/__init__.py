"""Test support: builders of tiny random models for tests, benchmarks and the demo. Not used by the pipeline."""
