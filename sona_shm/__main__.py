"""``python -m sona_shm`` is the ``sona-shm`` command."""

import sys

from .cli import main

sys.exit(main())
