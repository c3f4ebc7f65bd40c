import sys

from fiseclip_lib.cli import main

sys.exit(main())
