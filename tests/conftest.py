"""Suite-wide settings: one torch thread, so tests and the service processes they start do not
oversubscribe a small machine's cores (torch's spinning worker threads slow everything down)."""
import torch

torch.set_num_threads(1)
