"""``python -m egm.cli``: the same as the ``egm-assist`` script (used to start subprocesses)."""

import sys

from egm.cli.main import main

sys.exit(main())
