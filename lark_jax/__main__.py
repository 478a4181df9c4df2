import sys

from lark_jax.cli import main

sys.exit(main())
