"""optc's passes: one module per pass, a registry, pipelines and the PassManager."""

from optc.passes.base import Option, PassContext, PassInfo, PassResult, get_pass, register_pass, registry
from optc.passes.manager import PassManager, PipelineReport, run_pipeline
from optc.passes.pipeline import Pipeline, parse, resolve

__all__ = ["Option", "PassContext", "PassInfo", "PassResult", "PassManager", "Pipeline", "PipelineReport",
           "get_pass", "parse", "register_pass", "registry", "resolve", "run_pipeline"]
