"""The entry point PyInstaller freezes into dist/bin/shoal-server (see scripts/build)."""

import sys

from coord.cli import main

if __name__ == "__main__":
    sys.exit(main())
