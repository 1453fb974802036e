import os
import sys
from pathlib import Path

import torch

# Offline, always: nothing in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tiny_models)
# Tiny models: one thread is fastest and immune to the spin-waits of oversubscribed cores.
torch.set_num_threads(1)
