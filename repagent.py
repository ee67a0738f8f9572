#!/usr/bin/env python3
"""repagent: not yet implemented (see the project's issues)."""

import sys

if __name__ == "__main__":
    sys.exit("repagent.py: not yet")
