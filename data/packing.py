"""Packing: token sequences -> fixed-length decoder rows, all images -> one encoder stream.

One `PackedBatch` describes the packing (sample ids, positions, image grid sizes); every mask is
derived from it, so the encoder's block-diagonal mask, the decoder's block-diagonal causal mask and
the loss mask cannot disagree.

A batch on the GPU keeps its host copy (`host`): whatever needs a value on the host (a sequence
length, an image's grid, how many keys a row has) is read there, so the forward pass never waits
for the GPU to answer and the host can queue kernels ahead of it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from mmpretrain.data.images import THUMBNAIL
from mmpretrain.data.resize import normalize
from mmpretrain.data.sequence import TokenSequence


def _no_tiles() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


def on_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` (host memory) on `device`. To a GPU from pinned memory, queued without waiting: the
    host allocator keeps the pinned copy until the transfer is done."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def patch_layout(sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image grids `sizes` [n_images, 2] (patch rows, cols; host memory) -> for each patch of their
    stream, image after image and row-major within one: (index of its image's first patch, its
    index within its image, its image's cols), each [n_patches]."""
    n = sizes[:, 0] * sizes[:, 1]  # [n_images]
    first = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    local = torch.arange(len(first)) - first
    return first, local, torch.repeat_interleave(sizes[:, 1], n)


@dataclass
class PackedBatch:
    """A micro-batch: `b` packed rows of `s` tokens and the images they reference."""

    tokens: torch.Tensor  # [b, s] int64
    labels: torch.Tensor  # [b, s] int64, the next token within the same sample (0 elsewhere)
    loss_mask: torch.Tensor  # [b, s] float32, 1 where labels[i] is a text token of the same sample
    position_ids: torch.Tensor  # [b, s] int64, restarting at 0 for each sample and the padding
    sample_ids: torch.Tensor  # [b, s] int64, sample index within the row, -1 on padding
    patches: torch.Tensor  # [n_patches, 3*p*p] float32, all images back to back
    image_sizes: torch.Tensor  # [n_images, 2] int64 patch grid (rows, cols), in placeholder order
    image_tiles: torch.Tensor = field(default_factory=_no_tiles)  # [n_images] int64: 0 a whole
    # image, k >= 1 its k-th tile, -1 a global thumbnail (NVLM tiles policy)
    image_anchors: torch.Tensor = field(default_factory=_no_tiles)  # [n_images] int64: flat
    # index r * s + t of the token introducing each image (marker, tag, first placeholder); -1 none
    on_host = None  # not a field: this batch in host memory, kept by `to` (None: this one is)

    @property
    def host(self) -> PackedBatch:
        """This batch in host memory, where its values are read without waiting for the device
        (copied once, waiting, for a batch built on a device)."""
        if self.on_host is None and self.tokens.device.type != "cpu":
            self.on_host = self.to("cpu")
        return self if self.on_host is None else self.on_host

    def to(self, device) -> PackedBatch:
        """The batch on `device` (copies queued, not awaited), keeping its host copy."""
        moved = PackedBatch(**{f.name: on_device(getattr(self, f.name), device)
                               for f in fields(self)})
        to_host = moved.tokens.device.type == "cpu" and self.tokens.device.type != "cpu"
        if not to_host:  # (a copy to the host is its own host copy)
            moved.on_host = self.host
        return moved

    def from_host(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, computed on the host, on this batch's device."""
        return on_device(t, self.tokens.device)

    @property
    def efficiency(self) -> float:
        """Share of the b * s token slots that hold a sample (not padding)."""
        return float((self.sample_ids >= 0).float().mean())

    @property
    def image_cu_seqlens(self) -> torch.Tensor:
        """[n_images + 1] offsets of each image's patches in the encoder stream."""
        n = self.image_sizes[:, 0] * self.image_sizes[:, 1]
        return torch.cat([n.new_zeros(1), n.cumsum(0)])

    @property
    def patch_positions(self) -> torch.Tensor:
        """[n_patches, 2] (row, col) of each patch within its own image."""
        _, local, cols = patch_layout(self.host.image_sizes)
        return self.from_host(torch.stack([local // cols, local % cols], -1))

    def encoder_attention_mask(self) -> torch.Tensor:
        """[1, 1, n, n] bool, True where a patch may NOT attend (another image)."""
        n = self.image_sizes[:, 0] * self.image_sizes[:, 1]
        image_of = torch.repeat_interleave(torch.arange(len(n), device=n.device), n)  # [n_patches]
        return (image_of[:, None] != image_of[None, :])[None, None]

    def decoder_attention_mask(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where a token may NOT attend (other sample or future)."""
        sid = self.sample_ids
        s = sid.shape[1]
        same = sid[:, :, None] == sid[:, None, :]  # [b, s, s]
        causal = torch.ones(s, s, dtype=torch.bool, device=sid.device).tril()
        return ~(same & causal)[:, None]

    def decoder_seqlens(self) -> torch.Tensor:
        """[n_runs] lengths (host memory) of the runs of one sample (the padding of a row is one
        more run), row after row: the thd description of the decoder stream [b*s] that
        `decoder_attention_mask` describes densely (a token sees the earlier tokens of its run)."""
        sid = self.host.sample_ids
        starts = torch.ones_like(sid, dtype=torch.bool)  # [b, s]
        starts[:, 1:] = sid[:, 1:] != sid[:, :-1]
        at = starts.flatten().nonzero()[:, 0]  # [n_runs] first token of each run
        return torch.diff(at, append=at.new_tensor([sid.numel()]))

    def image_slots(self, image_token_id: int) -> torch.Tensor:
        """[n_slots] positions of the image tokens in the flattened [b*s] rows (on the device),
        where the image embeddings go, in stream order."""
        return self.from_host((self.host.tokens.flatten() == image_token_id).nonzero()[:, 0])

    def images_in_stream(self, design: str) -> torch.Tensor:
        """[n_images] bool (host memory): images placed in the token stream rather than
        cross-attended: H's thumbnails; none for X (D places every image, and has no
        cross-attention)."""
        if design == "h":
            return self.host.image_tiles == THUMBNAIL
        return torch.zeros(len(self.image_sizes), dtype=torch.bool)

    def tokens_per_image(self, merge: int = 1) -> torch.Tensor:
        """[n_images] projected tokens of each image (its patch grid merged `merge` x `merge`),
        in host memory."""
        sizes = self.host.image_sizes
        return (sizes[:, 0] // merge) * (sizes[:, 1] // merge)

    def cross_attention_mask(self, cross: torch.Tensor, merge: int = 1) -> torch.Tensor:
        """[b, 1, s, k] bool, True where a token may NOT attend to an image token (X/H designs).

        The k columns are the projected tokens ((rows/merge) * (cols/merge) each) of the images
        selected by `cross` [n_images] bool (host memory), in stream order. A token sees an image
        of its own sample whose anchor is at or before it (a marker sees its own image)."""
        host = self.host  # a reference for tests: built on the host, then moved
        b, s = host.sample_ids.shape
        anchors = host.image_anchors[cross]  # [n]
        row, at = anchors // s, anchors % s  # [n]
        sid = host.sample_ids[row, at]  # [n]
        pos = torch.arange(s)
        visible = ((torch.arange(b)[:, None, None] == row)
                   & (host.sample_ids[:, :, None] == sid) & (pos[None, :, None] >= at))  # [b, s, n]
        visible = visible.repeat_interleave(self.tokens_per_image(merge)[cross], dim=2)  # [b, s, k]
        return self.from_host(~visible[:, None])

    def cross_attention_rows(self, cross: torch.Tensor, merge: int = 1,
                             multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's own keys: (index [b, kr], mask [b, 1, s, kr] bool, True = may NOT attend).

        Row r's keys are the projected tokens of the images (selected by `cross`, host memory)
        that its samples reference; `index` gives their positions among all selected images'
        tokens (0 where a row has fewer than kr), and the mask is `cross_attention_mask`
        restricted to them, so a row never attends over the other rows' images. kr is rounded up
        to a `multiple` with keys nobody sees (`FP8_MULTIPLE`: FP8 GEMMs take row counts in
        multiples of 16)."""
        index, at, valid = self.host.row_keys(cross, merge, multiple)  # [b, kr] each
        index, at, valid = self.from_host(index), self.from_host(at), self.from_host(valid)
        sid = self.sample_ids.gather(1, at)  # [b, kr] sample of each key
        pos = torch.arange(self.sample_ids.shape[1], device=at.device)
        visible = (valid[:, None, :] & (self.sample_ids[:, :, None] == sid[:, None, :])
                   & (pos[None, :, None] >= at[:, None, :]))  # [b, s, kr]
        return index, ~visible[:, None]

    def row_keys(self, cross: torch.Tensor, merge: int,
                 multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`cross_attention_rows`' host part: (index, anchor position in the row, valid),
        [b, kr] each, from the (host) image anchors and sizes."""
        b, s = self.sample_ids.shape
        anchors, per_image = self.image_anchors[cross], self.tokens_per_image(merge)[cross]  # [n]
        token_anchor = anchors.repeat_interleave(per_image)  # [k] anchor of each image token
        token_row = token_anchor // s
        if len(token_row) and bool((token_row[1:] < token_row[:-1]).any()):
            raise ValueError("images are not in row order in the packed batch")
        count = torch.bincount(token_row, minlength=b)  # [b]
        start = torch.cumsum(count, 0) - count  # [b]
        width = -(-int(count.max()) // multiple) * multiple if len(token_row) else 0
        offsets = torch.arange(width)
        valid = offsets[None, :] < count[:, None]  # [b, kr]
        index = torch.where(valid, start[:, None] + offsets[None, :], 0)  # [b, kr]
        at = token_anchor[index] % s if width else index  # [b, kr] anchor position in the row
        return index, at, valid


def encoder_stream(patches: list[torch.Tensor]) -> torch.Tensor:
    """All images' patches back to back as float32 [n, 3*p*p]; uint8 pixels normalised here."""
    if not patches:
        return torch.zeros(0, 0)
    if all(p.dtype == torch.uint8 for p in patches):
        return normalize(torch.cat(patches))  # one pass over the micro-batch's stream
    return torch.cat([normalize(p) if p.dtype == torch.uint8 else p for p in patches])


def pack_rows(rows: list[list[TokenSequence]], seq_len: int, pad_id: int) -> PackedBatch:
    """Lay out rows of sequences (each row's total length <= seq_len) as a PackedBatch."""
    b = len(rows)
    tokens = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.zeros(b, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(b, seq_len)
    position_ids = torch.zeros(b, seq_len, dtype=torch.long)
    sample_ids = torch.full((b, seq_len), -1, dtype=torch.long)
    patches, sizes, tiles, anchors = [], [], [], []
    for r, row in enumerate(rows):
        at = 0
        for k, seq in enumerate(row):
            n = len(seq)
            assert at + n <= seq_len, "row overflows seq_len"
            ids = torch.tensor(seq.ids)
            tokens[r, at:at + n] = ids
            labels[r, at:at + n - 1] = ids[1:]
            loss_mask[r, at:at + n - 1] = torch.tensor(seq.is_text[1:], dtype=torch.float32)
            position_ids[r, at:at + n] = torch.arange(n)
            sample_ids[r, at:at + n] = k
            for i, img in enumerate(seq.images):
                anchors.append(r * seq_len + at + seq.anchors[i] if i < len(seq.anchors) else -1)
                patches.append(img.patches)
                sizes.append((img.rows, img.cols))
                tiles.append(img.tile)
            at += n
        position_ids[r, at:] = torch.arange(seq_len - at)  # the padding is one more run
    return PackedBatch(
        tokens, labels, loss_mask, position_ids, sample_ids, encoder_stream(patches),
        torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        torch.tensor(tiles, dtype=torch.long), torch.tensor(anchors, dtype=torch.long),
    )


class RowPacker:
    """Greedy packer: fills rows in arrival order; emits `rows_per_batch` rows at a time."""

    def __init__(self, seq_len: int, rows_per_batch: int, pad_id: int):
        self.seq_len, self.rows_per_batch, self.pad_id = seq_len, rows_per_batch, pad_id
        self.rows: list[list[TokenSequence]] = []
        self.current: list[TokenSequence] = []
        self.used = 0

    def add(self, seq: TokenSequence) -> PackedBatch | None:
        """Add one sequence (len <= seq_len); return a batch when one is complete."""
        if self.used + len(seq) > self.seq_len:
            self.rows.append(self.current)
            self.current, self.used = [], 0
        self.current.append(seq)
        self.used += len(seq)
        if len(self.rows) == self.rows_per_batch:
            batch = pack_rows(self.rows, self.seq_len, self.pad_id)
            self.rows = []
            return batch
        return None

    def flush(self) -> PackedBatch | None:
        """The pending rows as a last batch, padded with empty rows; None when nothing waits."""
        rows = self.rows + ([self.current] if self.current else [])
        self.rows, self.current, self.used = [], [], 0
        if not rows:
            return None
        return pack_rows(rows + [[]] * (self.rows_per_batch - len(rows)), self.seq_len, self.pad_id)
