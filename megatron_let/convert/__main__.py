import sys

from megatron_let.convert.cli import main

sys.exit(main())
