"""What the framework adapters (tracin.torch, tracin.jax) share: the export loop itself (driver),
checkpoint lists, layer patterns, data / checkpoint / function fingerprints, the metadata schema,
row transforms (projection), sinks and the resume check. Each adapter keeps only its framework's
gradient computation. Imports only numpy (tqdm lazily).
"""
