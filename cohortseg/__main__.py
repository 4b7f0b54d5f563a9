import sys

from cohortseg.cli import main

sys.exit(main())
