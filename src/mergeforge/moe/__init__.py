"""Mixture of experts from dense experts: ``mergeforge moe CONFIG OUT`` reads mergekit-moe's YAML
unchanged and writes a Mixtral or Qwen2-MoE folder that ``transformers`` loads (README: "Mixture
of experts from dense experts").

``config.py`` (the YAML and its checks) -> ``inputs.py`` (headers: architectures, sizes,
tensors) -> ``layout.py`` (the output's tensors and config.json) -> ``gates.py`` (router rows
from prompts; ``forward.py``: a Llama base's forward pass without transformers' modelling
code) -> ``assemble.py`` (stream through the atomic writer, beside the gate computation);
``report.py``: how a MoE routes held-out prompts.
"""

from mergeforge.moe.assemble import MoEPlan, MoEResult, build_moe, prepare_moe
from mergeforge.moe.config import Expert, MoEConfig, load_moe_config
from mergeforge.moe.report import RoutingReport, load_prompt_groups, routing_report

__all__ = [
    "Expert",
    "MoEConfig",
    "MoEPlan",
    "MoEResult",
    "RoutingReport",
    "build_moe",
    "load_moe_config",
    "load_prompt_groups",
    "prepare_moe",
    "routing_report",
]
