import sys

from mquant.cli import main

sys.exit(main())
