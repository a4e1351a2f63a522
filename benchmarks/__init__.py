"""tracin benchmarks: each module runs tracin and its peers side by side (python -m benchmarks.NAME)."""
