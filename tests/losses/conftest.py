"""Makes the slow loop references in ``loss_refs.py`` importable from the loss tests."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
