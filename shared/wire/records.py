"""The transmission record: what one transmission carried and how, as both REST APIs report it.

Link (its scheme and channel uses), channel (requested and measured SNR, channel uses), bits (payload, symbols, channel uses, the
bandwidth ratio, the JPEG comparison),
the semantic maps and the sampling are read from the transmission's wire header in one place,
`TransmissionRecord.from_header`. The sender's 202 answer extends it with its URLs, the
receiver's status with the job's progress; the receiver's store keeps its JSON form.
"""
from __future__ import annotations

from pydantic import BaseModel

from gesco.v1 import gesco_pb2
from shared.limits import SamplingOptions
from shared.semantic import codec, rate_quality
from shared.semantic.links import LinkFraming
from shared.wire import transport


class ChannelRecord(BaseModel):
    """The channel simulator's report; empty when the header reached the receiver without it."""

    model: str | None = None
    snr_definition: str | None = None
    requested_snr_db: float | None = None
    measured_snr_db: float | None = None
    channel_uses: int | None = None  # complex channel uses


class BitsRecord(BaseModel):
    payload_bits: int
    num_symbols: int
    channel_uses: int | None = None
    # The source: the H x W x 3 RGB image at the sender's map size; the ratio is the complex channel
    # uses the symbols take (ceil(num_symbols / 2)) per source value (docs/rate-quality.md). None
    # only in a record a receiver stored before these fields existed.
    source_values: int | None = None
    bandwidth_ratio: float | None = None
    image_bits_jpeg: int  # the full image as JPEG, for the comparison (0 for uploaded label maps)
    image_jpeg_quality: int = 0


class SemanticRecord(BaseModel):
    num_classes: int
    height: int
    width: int
    map_height: int
    map_width: int
    present_class_ids: list[int]
    downsample_factor: int
    compression: str
    jpeg_quality: int


class LinkRecord(BaseModel):
    """How the scene travelled: the link (gesco.options.Link), its scheme and the channel uses it took."""

    name: str
    scheme: str
    channel_uses: int  # complex channel uses
    bandwidth_ratio: float  # complex channel uses per source value
    code_blocks: int | None = None  # digital: LDPC code blocks
    payload_bytes: int | None = None  # digital: the LZMA-coded label map
    model: str | None = None  # learned: the map encoder

    @classmethod
    def of(cls, semantic: codec.SemanticHeader, framing: LinkFraming) -> LinkRecord:
        uses = rate_quality.channel_uses(semantic.num_symbols)
        common = {"name": framing.link.value, "channel_uses": uses,
                  "bandwidth_ratio": rate_quality.bandwidth_ratio(uses, semantic.height, semantic.width)}
        if framing.digital is not None:
            return cls(scheme=f"{framing.digital.scheme}, labels {semantic.map_height}x{semantic.map_width}",
                       code_blocks=framing.digital.num_blocks, payload_bytes=framing.digital.payload_bytes, **common)
        if framing.learned_model is not None:
            return cls(scheme=framing.learned_model, model=framing.learned_model, **common)
        maps = f", JPEG q{semantic.jpeg_quality} maps" if semantic.compression is codec.Compression.JPEG else ""
        return cls(scheme=f"present-class maps, factor {semantic.downsample_factor}{maps}", **common)


class SamplingRecord(BaseModel):
    sampler: str | None  # None: the receiver's default (the sender reports what it asked for)
    steps: int | None  # None: the sampler's default
    guidance: float
    seed: int
    use_fds: bool


class TransmissionRecord(BaseModel):
    channel: ChannelRecord
    bits: BitsRecord
    semantic: SemanticRecord
    sampling: SamplingRecord
    # None only in a record a receiver stored before links existed.
    link: LinkRecord | None = None

    @classmethod
    def from_header(
        cls,
        header: gesco_pb2.TransmissionHeader,
        request: gesco_pb2.SamplingRequest,
        resolved: SamplingOptions | None = None,
    ) -> TransmissionRecord:
        """The record of a header whose semantic part is valid, sampled as `request` asks (with
        the sampler and steps of `resolved` once the receiver has filled in its defaults)."""
        semantic = transport.semantic_header_from_proto(header.semantic)
        framing = transport.link_framing_from_proto(header.semantic)
        report = header.channel_report if header.HasField("channel_report") else None
        channel = ChannelRecord()
        if report is not None:
            channel = ChannelRecord(
                model=report.model,
                snr_definition=_snr_definition_name(report.snr_definition),
                requested_snr_db=report.requested_snr_db,
                measured_snr_db=report.measured_snr_db,
                channel_uses=report.channel_uses,
            )
        options = resolved or SamplingOptions(sampler=request.sampler, steps=request.steps, guidance=request.guidance)
        return cls(
            channel=channel,
            bits=BitsRecord(
                payload_bits=semantic.payload_bits,
                num_symbols=semantic.num_symbols,
                channel_uses=channel.channel_uses,
                source_values=rate_quality.source_values(semantic.height, semantic.width),
                bandwidth_ratio=rate_quality.bandwidth_ratio(
                    rate_quality.channel_uses(semantic.num_symbols), semantic.height, semantic.width),
                image_bits_jpeg=header.image_bits_jpeg,
                image_jpeg_quality=header.image_jpeg_quality,
            ),
            semantic=SemanticRecord(
                num_classes=semantic.num_classes,
                height=semantic.height,
                width=semantic.width,
                map_height=semantic.map_height,
                map_width=semantic.map_width,
                present_class_ids=list(semantic.present_class_ids),
                downsample_factor=semantic.downsample_factor,
                compression=semantic.compression.value,
                jpeg_quality=semantic.jpeg_quality,
            ),
            sampling=SamplingRecord(
                sampler=options.sampler or None,
                steps=options.steps or None,
                guidance=options.guidance,
                seed=request.seed,
                use_fds=request.use_fds,
            ),
            link=LinkRecord.of(semantic, framing),
        )


def _snr_definition_name(value: int) -> str | None:
    try:
        return transport.snr_definition_from_proto(value)
    except ValueError:
        return None
