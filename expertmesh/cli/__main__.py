import sys

from expertmesh.cli.commands import main

sys.exit(main())
