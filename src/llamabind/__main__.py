import sys

from llamabind.cli import main

sys.exit(main())
