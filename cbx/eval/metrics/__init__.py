"""Built-in metric groups. Importing this package registers every metric.

``GROUPS`` maps a group name to its class; the scorer instantiates the groups whose metrics
were asked for. Each module registers its :class:`cbx.eval.registry.MetricSpec` entries at
import time (registration only: models load in ``MetricGroup.load``).
"""

from __future__ import annotations

from cbx.eval.metrics import artifacts, asr, cost, fidelity, mos, speaker

GROUPS = {
    "asr": asr.AsrGroup,
    "speaker": speaker.SpeakerGroup,
    "mos": mos.MosGroup,
    "artifacts": artifacts.ArtifactGroup,
    "cost": cost.CostGroup,
    "fidelity": fidelity.FidelityGroup,
}
