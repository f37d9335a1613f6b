import sys

from zipvl_compile.demo.cli import main

sys.exit(main())
