import sys

from rlhf_trainer.cli import main

sys.exit(main())
