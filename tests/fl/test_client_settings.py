"""What `tensorwire client` hands a script through the environment is every setting it has: a
setting that did not survive the trip would silently fall back to its default in the script."""

from __future__ import annotations

import dataclasses

import pytest

from fl.client import ClientSettings


def test_every_setting_survives_the_environment() -> None:
    settings = ClientSettings(
        server_url="grpcs://server.example:8765",
        site="site-7",
        token="s3cret",
        pki_dir="/etc/tensorwire/pki",
        heartbeat_interval=2.5,
        connect_timeout=4.0,
        idle_timeout=33.0,
        progress=True,
        fallback_urls=("tcps://relay-2.example:8770", "grpcs://server.example:8765"),
        failover_after=7.0,
    )
    carried = {f.name for f in dataclasses.fields(ClientSettings)} - {"endpoint_overrides"}
    defaults = ClientSettings(server_url="x", site="y")
    changed = {n for n in carried if getattr(settings, n) != getattr(defaults, n)}
    assert changed == carried  # the test sets every field away from its default
    assert ClientSettings.from_env(settings.environment()) == settings


def test_missing_server_or_site_is_named() -> None:
    with pytest.raises(RuntimeError, match="set TENSORWIRE_SERVER and TENSORWIRE_SITE"):
        ClientSettings.from_env({})
