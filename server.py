"""Run Clarity's OpenAI-compatible server: `python server.py --weights DIR` (same as `clarity serve`)."""

import sys

from clarity.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
