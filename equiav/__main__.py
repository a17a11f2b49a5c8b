import sys

from equiav.cli import main

sys.exit(main())
