import sys

from peftc.cli import main

sys.exit(main())
