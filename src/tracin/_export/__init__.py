"""Plumbing shared by the framework adapters (tracin.torch, tracin.jax): checkpoint lists, layer
patterns, data and checkpoint fingerprints, the metadata schema, projection, sinks and the progress
bar. Each adapter keeps only its framework's gradient computation. Imports only numpy (tqdm lazily).
"""
