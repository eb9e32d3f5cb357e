"""Run Clarity's OpenAI-compatible server: `python server.py --weights DIR` (same as `clarity serve`)."""

import sys

from clarity.serving.app import main

if __name__ == "__main__":
    sys.exit(main())
