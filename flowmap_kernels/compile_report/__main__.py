"""``python -m flowmap_kernels.compile_report``: see the package docstring."""
import sys

from . import main

sys.exit(main())
