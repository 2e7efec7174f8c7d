"""Which anomalies stop training: plain Python over (split, feature, kind, text) records, so
the rule can be read and tested without TFX or TFDV."""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Sequence


@dataclasses.dataclass(frozen=True)
class Anomaly:
    split: str
    feature: str
    kinds: Sequence[str]  # TFDV's AnomalyInfo.Type names, e.g. ENUM_TYPE_UNEXPECTED_STRING_VALUES
    severity: str  # ERROR or WARNING
    short_description: str
    description: str

    def line(self) -> str:
        return (f"split '{self.split}', feature '{self.feature}': {self.short_description} "
                f"({self.description}) [{', '.join(self.kinds)}]")


def blocking(anomalies: Iterable[Anomaly], tolerated: Dict[str, Sequence[str]]) -> List[Anomaly]:
    """The ERROR anomalies not tolerated by `tolerated` (feature -> anomaly kinds it may show).

    An anomaly is tolerated only when every one of its kinds is listed for its feature: a real
    folder's own class names may fall outside the synthetic label domain, but a label that is
    missing altogether still stops the run.
    """
    return [anomaly for anomaly in anomalies
            if anomaly.severity == "ERROR"
            and not set(anomaly.kinds) <= set(tolerated.get(anomaly.feature, ()))]


def stop_message(blocked: Sequence[Anomaly], schema_hint: str) -> str:
    return ("Training stopped: the examples violate the schema "
            f"({schema_hint}). Fix the data or the schema, then run again.\n  "
            + "\n  ".join(anomaly.line() for anomaly in blocked))
