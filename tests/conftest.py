import os
import sys
from pathlib import Path

import torch

# Offline, always: nothing in the tests may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (tiny_models)
torch.set_num_threads(min(2, torch.get_num_threads()))
