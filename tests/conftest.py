"""Suite-wide set-up: make tests/ importable as a package root (tests.reference)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
