"""An ONNX model as the torch module that Quantus and Captum call: forward runs an ONNX Runtime session (import
after ``pytest.importorskip("torch")``)."""
from __future__ import annotations

import numpy as np
import torch


class OrtModule(torch.nn.Module):
    """forward(x) = session.run(x) as a torch tensor; ``seen`` keeps every batch it was given."""

    def __init__(self, session, input_name: str) -> None:
        super().__init__()
        self.session, self.input_name, self.seen = session, input_name, []

    def forward(self, x):
        batch = x.detach().cpu().numpy().astype(np.float32)
        self.seen.append(batch)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])
