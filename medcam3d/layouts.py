"""Layouts: how the explained layer's output maps onto ``[B, F, *spatial]``.

The explanation math (:mod:`medcam3d.methods`) works on activations shaped ``[B, F, *spatial]``: batch,
features, then 1-3 spatial axes. Most CNNs emit exactly that, but some do not. AxialNet (Draelos & Carin) puts
the slices of one CT volume into the batch axis: its explained layer emits ``[B*S, F, h, w]``. A layout turns the
hooked tensor into a volume ``[B, F, S, h, w]`` so that, for instance, Grad-CAM's feature weights are averaged over
the whole volume (``S*h*w``) as the paper's authors did, and maps come out as volumes.

A layout is any object with ``to_volume(t, batch_size) -> Tensor`` (see :class:`Layout`). It must be a pure
re-indexing (a view, permute or reshape) so that gradients can be mapped the same way as activations.

A model may declare its own layout and default target layer as attributes::

    class MyNet(nn.Module):
        medcam3d_target_layer = "conv2d.7"
        medcam3d_layout = SlicesAsBatch()
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from .errors import InputError

__all__ = ["ChannelsFirst", "ChannelsLast", "Layout", "SlicesAsBatch", "resolve_layout"]


@runtime_checkable
class Layout(Protocol):
    """Maps the hooked layer output ``[N, ...]`` of a batch of ``batch_size`` inputs to ``[B, F, *spatial]``."""

    def to_volume(self, t: Tensor, batch_size: int) -> Tensor:
        """Args: ``t`` the hooked tensor (``[N, ...]``); ``batch_size`` B of the model input.

        Returns: ``[B, F, *spatial]``, a re-indexing of ``t`` (no arithmetic)."""
        ...


class ChannelsFirst:
    """The usual CNN layout: the layer emits ``[B, F, *spatial]`` already (identity)."""

    def to_volume(self, t: Tensor, batch_size: int) -> Tensor:
        if t.ndim < 3:
            raise InputError(
                f"the explained layer's output has shape {tuple(t.shape)}; expected [B, F, *spatial] with 1-3 "
                "spatial axes (choose a convolutional layer, or give a layout)"
            )
        if t.shape[0] != batch_size:
            raise InputError(
                f"the explained layer's output has batch size {t.shape[0]} but the input has {batch_size}; "
                "if the model puts slices in the batch axis, use layout=SlicesAsBatch()"
            )
        return t

    def __repr__(self) -> str:
        return "ChannelsFirst()"


class SlicesAsBatch:
    """Slices (or any sub-volumes) ride in the batch axis: ``[B*S, F, *s] -> [B, F, S, *s]``.

    The ``B*S`` rows must be ordered sample-major (all slices of sample 0, then sample 1, ...), which is what
    ``x.reshape(B*S, ...)`` of a ``[B, S, ...]`` tensor gives. The slice axis becomes the first spatial axis.

    Args:
        slices: the number S of slices per sample; ``None`` infers it as ``N // batch_size``.
    """

    def __init__(self, slices: int | None = None) -> None:
        self.slices = slices

    def to_volume(self, t: Tensor, batch_size: int) -> Tensor:
        n = t.shape[0]
        if n % batch_size != 0:
            raise InputError(
                f"SlicesAsBatch: the explained layer's output has {n} rows, not a multiple of the batch size "
                f"{batch_size}"
            )
        s = n // batch_size if self.slices is None else self.slices
        if s * batch_size != n:
            raise InputError(f"SlicesAsBatch: expected {batch_size}x{s} rows, got {n}")
        v = t.reshape(batch_size, s, *t.shape[1:])  # [B, S, F, *s]
        return v.movedim(2, 1)  # [B, F, S, *s]

    def __repr__(self) -> str:
        return f"SlicesAsBatch(slices={self.slices})"


class ChannelsLast:
    """Features last, as in some transformer/Swin stages: ``[B, *spatial, F] -> [B, F, *spatial]``."""

    def to_volume(self, t: Tensor, batch_size: int) -> Tensor:
        if t.shape[0] != batch_size or t.ndim < 3:
            raise InputError(f"ChannelsLast: cannot read {tuple(t.shape)} as [B={batch_size}, *spatial, F]")
        return t.movedim(-1, 1)

    def __repr__(self) -> str:
        return "ChannelsLast()"


def resolve_layout(layout: Layout | str | None) -> Layout:
    """Return a layout object from an object, a name (``"channels_first"``, ``"slices_as_batch"``,
    ``"channels_last"``) or ``None`` (channels first)."""
    if layout is None:
        return ChannelsFirst()
    if isinstance(layout, str):
        table = {"channels_first": ChannelsFirst, "slices_as_batch": SlicesAsBatch, "channels_last": ChannelsLast}
        if layout not in table:
            raise InputError(f"unknown layout {layout!r}; choose one of {sorted(table)}")
        return table[layout]()
    if not isinstance(layout, Layout):
        raise InputError(f"layout {layout!r} has no to_volume(t, batch_size) method")
    return layout
