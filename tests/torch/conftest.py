import sys
from pathlib import Path

# tests/reference.py (the float64 NumPy reference) lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
