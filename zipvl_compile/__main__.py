import sys

from zipvl_compile.cli import main

sys.exit(main())
