"""`torchrun --nproc-per-node 2 tests/distributed/failing_rank.py [lowrank.train options]`: rank 1 raises
in its third training step, as a real fault would (a bad batch, a device error); rank 0 is fine."""

import os
import sys

from lowrank import recipe, train

step = recipe.training_step
calls = 0


def failing_on_rank_1(*args, **kwargs):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls == 3:
        raise RuntimeError("injected fault on rank 1 at its third step")
    return step(*args, **kwargs)


recipe.training_step = failing_on_rank_1
sys.exit(train.main())
