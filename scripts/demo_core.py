"""Small demo of the explanation core on an AxialNet-shaped toy model (until the CLI demo exists)."""

import torch
from torch import nn

from medcam3d import Explainer, SlicesAsBatch


class ToyAxial(nn.Module):
    medcam3d_target_layer = "act"
    medcam3d_layout = SlicesAsBatch()

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Conv2d(8, classes, kernel_size=16)

    def forward(self, x):
        b, s = x.shape[0], x.shape[2] // 3
        x = self.act(self.conv(x.reshape(b * s, 3, x.shape[3], x.shape[4])))
        return self.fc(x).reshape(b, s, -1).mean(1)


torch.manual_seed(0)
model = ToyAxial()
x = torch.randn(1, 1, 12, 16, 16)
with Explainer(model, methods=("hirescam", "gradcam")) as explainer:
    exp = explainer(x)
print(exp)
print(exp.certificate.summary())
print("HiResCAM sums:", exp.raw["hirescam"].flatten(2).sum(2))
print("scores - bias:", exp.scores - exp.certificate.baseline)
print("disagreement:", {k: v.tolist() for k, v in exp.disagreement().items()})
