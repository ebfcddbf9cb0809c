"""`python -m taskservice.cli`: taskctl without its installed script."""

import sys

from taskservice.cli import main

sys.exit(main())
