"""Training images/s of two phantom-gradient recipes with the Jacobian regulariser (worst case:
every solve runs to max_iter). Run from a checkout's root; alternate checkouts to compare commits:
    cd <checkout> && python /path/to/phantom_step.py
"""

import sys

import torch

sys.path.insert(0, ".")  # the checkout under test, not this file's
from bench.training import recipe_step_time  # noqa: E402

RECIPES = [
    ("seed, phantom, jac 5, f 8, batch 50",
     {"backward": "phantom", "jac_reg": 5.0, "f_max_iter": 8, "batch_size": 50}),
    ("cpu preset, phantom, jac 2, batch 64", {"preset": "cpu", "backward": "phantom"}),
]  # fmt: skip
for label, options in RECIPES:
    seconds, batch, _ = recipe_step_time(options, torch.device("cpu"), lambda: None, 5)
    print(f"{label}: {batch / seconds:.1f} images/s")
