"""Build script: the compiled parts (CPU extension, CUDA module) are added in setup_ext.py."""
from setuptools import setup

setup()
