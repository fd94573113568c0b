"""The documentation stays true to the code: every setting is documented, no stale one remains."""

from __future__ import annotations

import re
from pathlib import Path

from consumer.settings import ConsumerSettings

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_consumer_setting_is_documented_and_no_other() -> None:
    text = (DOCS / "consumer.md").read_text()
    documented = set(re.findall(r"^\| `SVD_([A-Z0-9_]+)` \|", text, flags=re.MULTILINE))
    actual = {name.upper() for name in ConsumerSettings.model_fields}
    assert documented == actual, {"undocumented": actual - documented, "stale": documented - actual}
