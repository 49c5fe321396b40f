import os
import sys

import torch

# tests import their shared models as a plain module
sys.path.insert(0, os.path.dirname(__file__))
# tiny models: one thread avoids oversubscription on small shared machines
torch.set_num_threads(1)
