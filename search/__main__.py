import sys

from vac.search.cli import main

sys.exit(main())
