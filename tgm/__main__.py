import sys

from tgm.cli import main

sys.exit(main())
