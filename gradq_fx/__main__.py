import sys

from gradq_fx.cli import main

sys.exit(main())
