import sys

from scpeft_cli.cli import main

sys.exit(main())
