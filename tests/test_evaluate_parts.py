"""The evaluation suite's part protocol and registry: a registered part runs inside the suite and appears in every
output (case records, summary, costs, passes, timings, markdown, files); names are unique."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from medcam3d.cli import build_parser
from medcam3d.data import LABELS
from medcam3d.evaluate.parts import (
    PARTS,
    REGISTRY,
    ModelUnderTest,
    PartBase,
    SuiteOptions,
    WrittenFile,
    get_part,
    register_part,
)
from medcam3d.evaluate.phantoms import DirectGrid, PhantomSource
from medcam3d.evaluate.report import write_outputs
from medcam3d.evaluate.suite import evaluate
from medcam3d.files import write_text_atomic


class TinyGAP(nn.Module):
    """conv (stride 4) -> ReLU (explained: ``act``) -> global average pool -> Linear: an affine head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, stride=4, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, classes)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(2).mean(2))


@dataclass
class ToyCase:
    sums: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"toy_sums": self.sums}


@dataclass
class ToySummary:
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"toy": {"n": self.n}}


class ToyPart(PartBase[ToyCase, ToySummary]):
    """Σ of each HiResCAM map; spends one (pretend) pass per case; writes a file."""

    name = "toy"
    cost = "1 pretend pass per scan"
    pass_kinds: ClassVar[tuple[str, ...]] = ("toy",)

    def unit_passes(self, options: SuiteOptions) -> dict[str, int]:
        return {"toy_per_scan": 1}

    def run_case(self, run, case):
        run.spend("toy")
        return ToyCase({lab: float(v) for lab, v in zip(run.labels, case.raw["hirescam"].flatten(1).sum(1))})

    def summarise(self, run, cases):
        return ToySummary(len(cases))

    def render(self, summary, options, labels):
        return ["## Toy", "", f"{summary.n} cases", ""]

    def write(self, summary, out):
        path = write_text_atomic(out / "toy.txt", f"{summary.n}\n")
        return [WrittenFile("toy", path, "\n[toy](toy.txt)\n")]


@pytest.fixture
def toy():
    register_part(ToyPart)
    try:
        yield ToyPart
    finally:
        REGISTRY.pop("toy", None)


def test_builtin_parts_in_run_order():
    assert PARTS == ("exactness", "ground_truth", "localisation", "perturbation", "randomisation", "figure")
    assert tuple(REGISTRY)[: len(PARTS)] == PARTS
    assert SuiteOptions().parts == tuple(REGISTRY)  # default: every registered part


def test_duplicate_or_nameless_part_is_refused(toy):
    before = dict(REGISTRY)

    class Again(ToyPart):
        pass

    class Exactness(ToyPart):
        name = "exactness"

    class Nameless(ToyPart):
        name = ""

    for cls in (Again, Exactness, Nameless):
        with pytest.raises(ValueError):
            register_part(cls)
    assert REGISTRY == before  # nothing replaced
    assert get_part("toy") is ToyPart
    with pytest.raises(ValueError, match="known parts"):
        get_part("no_such_part")
    with pytest.raises(ValueError, match="no_such_part"):
        SuiteOptions(parts=("no_such_part",)).check()


def test_a_registered_part_appears_in_every_output(toy, tmp_path):
    torch.manual_seed(0)
    net = TinyGAP(len(LABELS)).eval()
    mut = ModelUnderTest(net, list(LABELS), "act", name="tiny")
    source = PhantomSource(DirectGrid((30, 64, 64)), 2, 3)
    result = evaluate(mut, source, SuiteOptions(parts=("exactness", "toy")))
    r = result.to_dict()

    # its case records: Σ HiResCAM = s − b for an affine head (completeness), per label
    bias = net.fc.bias.detach().double()
    for c in r["cases"]:
        assert list(c)[-2:] == ["exactness", "toy_sums"]  # after the built-in parts
        for k, lab in enumerate(LABELS):
            assert c["toy_sums"][lab] == pytest.approx(c["scores"][lab] - float(bias[k]), abs=1e-5)
    # its summary, cost, passes, per-unit passes and timing
    assert r["summary"]["toy"] == {"n": 2} and "exactness" in r["summary"]
    assert r["costs"]["toy"] == "1 pretend pass per scan"
    assert r["passes"]["toy"] == 2 and r["passes"]["explain"] == 2
    assert r["passes_per_class"]["toy_per_scan"] == 1
    assert "toy" in r["timings"]
    # the record keeps the JSON form reachable as before (dict-style access, for one release)
    assert result["summary"] == r["summary"] and result["cases"] == r["cases"]

    files = write_outputs(result, tmp_path / "out")
    assert files["toy"].read_text() == "2\n"
    md = files["markdown"].read_text()
    assert md.index("## Exactness") < md.index("## Toy") < md.index("## Costs") and "[toy](toy.txt)" in md
    assert json.loads(files["json"].read_text())["cases"][0]["toy_sums"] == r["cases"][0]["toy_sums"]


def test_command_line_offers_registered_parts(toy):
    args = build_parser().parse_args(["evaluate", "--out", "x", "--parts", "exactness", "toy"])
    assert args.parts == ["exactness", "toy"]
    assert build_parser().parse_args(["evaluate", "--out", "x"]).parts == list(REGISTRY)
