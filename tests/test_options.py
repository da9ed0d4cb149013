"""Every list of options users see is its registry's (gesco/options.py): the channel simulator's
models, the sampler registry, the wire format, the sender's REST and gRPC parameters, its
GET /v1/options (the web page's lists), the command line client and the launcher."""
from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import TypeAdapter

from gesco import cli, options
from gesco.options import ChannelModel, SnrDefinition, names
from gesco.v1 import gesco_pb2
from scripts import launch
from sender_service import web
from sender_service.settings import SenderSettings
from sender_service.transmissions import TransmissionParameters
from shared import limits
from shared.semantic import batched_link, channels, rate_quality
from shared.semantic.codec import Compression
from shared.semantic.diffusion import samplers
from shared.wire import transport

CHANNELS = list(names(ChannelModel))
SNR_DEFINITIONS = list(names(SnrDefinition))


def test_the_registries_name_the_same_options() -> None:
    assert channels.ChannelModel is ChannelModel and channels.SnrDefinition is SnrDefinition
    assert set(channels._MODELS) == set(ChannelModel)  # every model has an implementation
    assert set(options.CHANNEL_TITLES) == set(ChannelModel)
    assert set(options.SNR_DEFINITION_TITLES) == set(SnrDefinition)
    assert {name: cls.default_steps for name, cls in samplers.SAMPLERS.items()} == options.SAMPLER_DEFAULT_STEPS
    assert set(options.SAMPLER_TITLES) == set(options.SAMPLER_DEFAULT_STEPS)
    assert samplers.DEFAULT_SAMPLER == options.DEFAULT_SAMPLER in samplers.SAMPLERS
    assert set(batched_link.SNR_DEFINITIONS) == set(SNR_DEFINITIONS)
    assert rate_quality.TABLE_SNR_DEFINITION in SNR_DEFINITIONS
    assert 0 <= options.DEFAULT_GUIDANCE <= limits.MAX_GUIDANCE
    assert limits.MIN_SNR_DB <= options.DEFAULT_SNR_DB <= limits.MAX_SNR_DB
    assert limits.MIN_RICIAN_K_DB <= options.DEFAULT_RICIAN_K_DB <= limits.MAX_RICIAN_K_DB
    assert all(1 <= factor <= limits.MAX_DOWNSAMPLE_FACTOR for factor in options.DOWNSAMPLE_FACTORS)


def test_the_wire_format_carries_every_snr_definition() -> None:
    for definition in SnrDefinition:
        value = transport.snr_definition_to_proto(definition.value)
        assert gesco_pb2.SnrDefinition.Name(value) == f"SNR_DEFINITION_{definition.name}"
        assert transport.snr_definition_from_proto(value) == definition.value


def test_the_senders_parameters_take_the_registries_choices_and_defaults() -> None:
    schema = TypeAdapter(TransmissionParameters).json_schema()
    assert schema["$defs"]["ChannelModel"]["enum"] == CHANNELS
    assert schema["$defs"]["SnrDefinition"]["enum"] == SNR_DEFINITIONS
    defaults = TransmissionParameters()
    assert (defaults.channel, defaults.snr_definition, defaults.guidance, defaults.rician_k_db) == (
        options.DEFAULT_CHANNEL, options.DEFAULT_SNR_DEFINITION, options.DEFAULT_GUIDANCE, options.DEFAULT_RICIAN_K_DB)
    assert channels.ChannelConfig().model is options.DEFAULT_CHANNEL


def _choices(parser: argparse.ArgumentParser, command: str, flag: str) -> list[str]:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in subparsers.choices[command]._actions if flag in a.option_strings)
    return list(action.choices)


def test_the_command_line_and_the_launcher_offer_the_registries_choices() -> None:
    assert _choices(cli.build_parser(), "send", "--channel") == CHANNELS
    assert _choices(cli.build_parser(), "sweep", "--snr-definition") == SNR_DEFINITIONS
    assert _choices(launch.build_parser(), "demo", "--snr-definition") == SNR_DEFINITIONS


def test_get_options_answers_the_registries_limits_and_defaults() -> None:
    app = FastAPI()
    app.include_router(web.router)
    settings = SenderSettings()
    app.state.sender = SimpleNamespace(settings=settings)
    answer = TestClient(app).get("/v1/options").json()
    assert [c["name"] for c in answer["channels"]] == CHANNELS
    assert [c["name"] for c in answer["snr_definitions"]] == SNR_DEFINITIONS
    assert {s["name"]: s["default_steps"] for s in answer["samplers"]} == options.SAMPLER_DEFAULT_STEPS
    assert [c["name"] for c in answer["compressions"]] == [c.value for c in Compression]
    assert answer["downsample_factors"] == list(options.DOWNSAMPLE_FACTORS)
    assert [c["name"] for c in answer["links"]] == ["maps", "digital", "learned", "auto"]
    assert answer["schemes"][0] == "QPSK r=1/5" and answer["schemes"][-1] == "64-QAM r=5/6"
    assert answer["limits"]["snr_db"] == {"min": limits.MIN_SNR_DB, "max": limits.MAX_SNR_DB}
    assert answer["limits"]["steps"] == {"min": limits.MIN_STEPS, "max": limits.MAX_STEPS}
    assert answer["limits"]["guidance"] == {"min": 0, "max": limits.MAX_GUIDANCE}
    assert answer["defaults"] == {
        "channel": options.DEFAULT_CHANNEL.value, "snr_definition": options.DEFAULT_SNR_DEFINITION.value,
        "snr_db": options.DEFAULT_SNR_DB, "rician_k_db": options.DEFAULT_RICIAN_K_DB,
        "sampler": options.DEFAULT_SAMPLER, "guidance": options.DEFAULT_GUIDANCE,
        "downsample_factor": settings.downsample_factor, "compression": settings.compression.value,
        "jpeg_quality": settings.jpeg_quality, "link": options.DEFAULT_LINK.value,
    }


def test_the_page_writes_no_option_of_its_own() -> None:
    """The page's lists come from GET /v1/options (the browser tests check it fills them)."""
    page = (Path(web.STATIC_DIR) / "index.html").read_text() + (Path(web.STATIC_DIR) / "app.js").read_text()
    for name in [*CHANNELS, *SNR_DEFINITIONS, *options.SAMPLER_DEFAULT_STEPS]:
        assert f'"{name}"' not in page, name
