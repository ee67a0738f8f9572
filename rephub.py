#!/usr/bin/env python3
"""rephub: not yet implemented (see the project's issues)."""

import sys

if __name__ == "__main__":
    sys.exit("rephub.py: not yet")
