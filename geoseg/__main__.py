"""``python -m geoseg`` is the ``geoseg`` command."""

import sys

from geoseg.cli.main import main

sys.exit(main())
