import sys
from pathlib import Path

# The shared helpers of these tests (torch_oracle.py) sit beside them; pytest runs in importlib mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
