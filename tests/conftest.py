import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py
sys.path.insert(0, str(Path(__file__).parent.parent))  # cli.py, evals/
