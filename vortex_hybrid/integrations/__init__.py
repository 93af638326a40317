"""Integrations of the hybrid runtime with model frameworks (`hf`: transformers)."""
