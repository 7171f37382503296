import sys

from megatron_prune.cli import main

sys.exit(main())
