"""``python -m rlhf_operator.controller``: the operator process (see ``main``)."""

import sys

from rlhf_operator.controller.main import main

sys.exit(main())
