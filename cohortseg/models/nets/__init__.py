"""Keras network definitions and weight loaders."""
