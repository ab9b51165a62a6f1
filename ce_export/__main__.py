import sys

from ce_export.cli import main

sys.exit(main())
