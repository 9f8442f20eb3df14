from __future__ import annotations

import sys

from mpsearch.cli import main

sys.exit(main())
